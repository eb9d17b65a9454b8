// Halo-and-Hann stitching: the per-pixel math shared by the OpenMP CPU kernel
// (stitch_cpu.cpp), the CUDA kernel (stitch_cuda.cu, also compiled by CuPy's NVRTC)
// and therefore tested on the CPU build. No shared memory, no warp intrinsics, no
// standard headers: NVRTC compiles this file as it is.
//
// Plan layout (built once on the host by build_stitch_plan, shared by every backend):
//   boxes    int32 (N, 6): y0, x0 of the patch, then the kept region ky0, ky1, kx0, kx1
//            in image coordinates (halo dropped on sides that do not touch the border)
//   cell_ptr int64 (ncy*ncx + 1), cell_idx int32: CSR lists of the patches whose kept
//            region meets each `cell`x`cell` block of the image, in ascending patch order,
//            so every backend sums the same terms in the same order (deterministic).
//   hann     (tile + 1, tile): row M holds numpy.hanning(M) (row 0 unused).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FASTDS_HD __host__ __device__ __forceinline__
#else
#define FASTDS_HD inline
#endif

namespace fastds {

// CSR list offsets: a global grid at stride 1 lists more than 2^31 (patch, cell) pairs,
// so offsets are 64-bit (patch indices and coordinates stay 32-bit).
typedef long long offset_t;

// A weight from its row and column Hann factors, floored at eps; every kernel's weight is
// this product, so the band kernel (which reads the factors from its tables) keeps the bits.
template <typename T>
FASTDS_HD T floored_weight(T wy, T wx, T eps) {
  const T w = wy * wx;
  return w > eps ? w : eps;
}

// Weight of pixel (y, x) inside patch box b (see plan layout), already floored at eps.
template <typename T>
FASTDS_HD T stitch_weight(const int* b, int y, int x, int tile, const T* hann, T eps) {
  return floored_weight<T>(hann[(b[3] - b[2]) * tile + (y - b[2])],
                           hann[(b[5] - b[4]) * tile + (x - b[4])], eps);
}

template <typename T>
FASTDS_HD T stitch_normalise(T s, T z, T eps) {
  return s / (z > eps ? z : eps);
}

// One output value: S / max(Z, eps), with S = sum w*p and Z = sum w over the patches whose
// kept region holds (y, x), in cell-list order. Pixels no patch covers get 0.
template <typename T>
FASTDS_HD T stitch_pixel(const T* patches, int C, int tile, int c, int y, int x,
                         const int* boxes, const offset_t* cell_ptr, const int* cell_idx,
                         int cell, int ncx, const T* hann, T eps) {
  const long cid = (long)(y / cell) * ncx + (x / cell);
  T s = T(0), z = T(0);
  const long plane = (long)tile * tile;
  for (offset_t k = cell_ptr[cid]; k < cell_ptr[cid + 1]; ++k) {
    const int n = cell_idx[k];
    const int* b = boxes + 6L * n;
    if (y < b[2] || y >= b[3] || x < b[4] || x >= b[5]) continue;
    const T w = stitch_weight<T>(b, y, x, tile, hann, eps);
    s += w * patches[((long)n * C + c) * plane + (long)(y - b[0]) * tile + (x - b[1])];
    z += w;
  }
  return stitch_normalise<T>(s, z, eps);
}

}  // namespace fastds
