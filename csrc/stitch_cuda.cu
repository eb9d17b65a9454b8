// CUDA gather kernel for Halo-and-Hann stitching: one thread per output value, the
// per-pixel math from stitch.h. Loaded two ways: compiled by nvcc into fastds._C_cuda
// (stitch_cuda_launch.cu includes this file) and by CuPy's RawModule (NVRTC), which is
// why the kernels are extern "C" and the file includes nothing but stitch.h.
#include "stitch.h"

#define FASTDS_STITCH_KERNEL(NAME, T)                                                    \
  extern "C" __global__ void NAME(const T* patches, int C, int tile, int H, int W,       \
                                  const int* boxes, const fastds::offset_t* cell_ptr,   \
                                  const int* cell_idx, int cell, int ncx, const T* hann, \
                                  T eps, T* out) {                                       \
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;                          \
    const long total = (long)C * H * W;                                                  \
    if (i >= total) return;                                                              \
    const int x = (int)(i % W);                                                          \
    const int y = (int)((i / W) % H);                                                    \
    const int c = (int)(i / ((long)W * H));                                              \
    out[i] = fastds::stitch_pixel<T>(patches, C, tile, c, y, x, boxes, cell_ptr,         \
                                     cell_idx, cell, ncx, hann, eps);                    \
  }

FASTDS_STITCH_KERNEL(fastds_stitch_f32, float)
FASTDS_STITCH_KERNEL(fastds_stitch_f64, double)
