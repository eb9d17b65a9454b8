// OpenMP gather kernel for Halo-and-Hann stitching and the host-side plan builder.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "stitch.h"
#include "stitch_cpu.h"

namespace fastds {

StitchPlan build_stitch_plan(const int64_t* starts, int64_t n, int H, int W, int tile,
                             int halo, int cell) {
  if (cell < 1) throw std::invalid_argument("cell must be >= 1, got " + std::to_string(cell));
  StitchPlan p;
  p.cell = cell;
  p.ncy = (H + cell - 1) / cell;
  p.ncx = (W + cell - 1) / cell;
  p.boxes.resize(6 * n);
  std::vector<offset_t> count(p.ncy * (size_t)p.ncx + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int y0 = (int)starts[2 * i], x0 = (int)starts[2 * i + 1];
    int32_t* b = &p.boxes[6 * i];
    b[0] = y0;
    b[1] = x0;
    b[2] = y0 > 0 ? y0 + halo : y0;
    b[3] = y0 + tile < H ? y0 + tile - halo : y0 + tile;
    b[4] = x0 > 0 ? x0 + halo : x0;
    b[5] = x0 + tile < W ? x0 + tile - halo : x0 + tile;
    for (int cy = b[2] / cell; cy <= (b[3] - 1) / cell; ++cy)
      for (int cx = b[4] / cell; cx <= (b[5] - 1) / cell; ++cx) ++count[cy * (size_t)p.ncx + cx + 1];
  }
  for (size_t c = 1; c < count.size(); ++c) count[c] += count[c - 1];
  p.cell_ptr = count;
  p.cell_idx.resize(count.back());
  // Counting sort in patch order keeps each cell's list ascending (deterministic sums).
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* b = &p.boxes[6 * i];
    for (int cy = b[2] / cell; cy <= (b[3] - 1) / cell; ++cy)
      for (int cx = b[4] / cell; cx <= (b[5] - 1) / cell; ++cx)
        p.cell_idx[count[cy * (size_t)p.ncx + cx]++] = (int32_t)i;
  }
  return p;
}

// Row form of the same gather: a thread owns output rows; within a row it walks each cell's
// candidate list once and accumulates a contiguous x-run per patch, instead of re-scanning
// the list per pixel. Every pixel still sums the same terms in the same (cell-list) order
// with the shared stitch_weight/stitch_normalise, so results equal stitch_pixel's bit for bit.
template <typename T>
void stitch_cpu(const T* patches, int C, int tile, int H, int W, const int* boxes,
                const offset_t* ptr, const int* idx, int cell, int ncx, const T* hann, T eps,
                T* out) {
  const long plane = (long)tile * tile;
#pragma omp parallel
  {
    std::vector<T> s(W), z(W);
#pragma omp for collapse(2) schedule(static)
    for (int c = 0; c < C; ++c)
      for (int y = 0; y < H; ++y) {
        std::fill(s.begin(), s.end(), T(0));
        std::fill(z.begin(), z.end(), T(0));
        const int cy = y / cell;
        for (int cx = 0; cx < ncx; ++cx) {
          const int xa = cx * cell, xb = std::min(W, xa + cell);
          const long cid = (long)cy * ncx + cx;
          for (offset_t k = ptr[cid]; k < ptr[cid + 1]; ++k) {
            const int n = idx[k];
            const int* b = boxes + 6L * n;
            if (y < b[2] || y >= b[3]) continue;
            const int x0 = std::max(xa, b[4]), x1 = std::min(xb, b[5]);
            const T* row = patches + ((long)n * C + c) * plane + (long)(y - b[0]) * tile - b[1];
            for (int x = x0; x < x1; ++x) {
              const T w = stitch_weight<T>(b, y, x, tile, hann, eps);
              s[x] += w * row[x];
              z[x] += w;
            }
          }
        }
        T* o = out + ((long)c * H + y) * W;
        for (int x = 0; x < W; ++x) o[x] = stitch_normalise<T>(s[x], z[x], eps);
      }
  }
}

// The CUDA kernel's exact per-pixel function, run on the CPU: how the CPU build tests the
// GPU arithmetic (tests compare it with the reference and with stitch_cpu).
template <typename T>
void stitch_pixelwise_cpu(const T* patches, int C, int tile, int H, int W, const int* boxes,
                          const offset_t* ptr, const int* idx, int cell, int ncx, const T* hann,
                          T eps, T* out) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int c = 0; c < C; ++c)
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x)
        out[((long)c * H + y) * W + x] = stitch_pixel<T>(patches, C, tile, c, y, x, boxes, ptr,
                                                         idx, cell, ncx, hann, eps);
}

template void stitch_cpu<float>(const float*, int, int, int, int, const int*, const offset_t*,
                                const int*, int, int, const float*, float, float*);
template void stitch_cpu<double>(const double*, int, int, int, int, const int*, const offset_t*,
                                 const int*, int, int, const double*, double, double*);

}  // namespace fastds

namespace fastds {
template void stitch_pixelwise_cpu<float>(const float*, int, int, int, int, const int*,
                                          const offset_t*, const int*, int, int, const float*,
                                          float, float*);
template void stitch_pixelwise_cpu<double>(const double*, int, int, int, int, const int*,
                                           const offset_t*, const int*, int, int, const double*,
                                           double, double*);
}  // namespace fastds
