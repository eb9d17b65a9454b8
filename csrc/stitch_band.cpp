// Band-scatter Halo-and-Hann stitching on the CPU, and the fused stitch-then-cut of step
// fusion. The gather kernel (stitch_cpu.cpp) walks ~20 candidate-list entries per output
// pixel and is latency-bound; here each thread owns a band of rows, keeps its S and Z rows
// hot in cache, and streams only the kept rows of the patches that meet the band. Per pixel
// the terms are still added in ascending patch order with stitch_weight's exact product and
// stitch_normalise, so the image is bit-identical to the gather's (tests check it).
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "stitch.h"
#include "stitch_cpu.h"

namespace fastds {

BandPlan build_band_plan(const int32_t* boxes, int64_t n, int H, int tile, int band) {
  if (band < 1) throw std::invalid_argument("band must be >= 1, got " + std::to_string(band));
  BandPlan p;
  p.band = band;
  p.nb = (H + band - 1) / band;
  std::vector<std::vector<int32_t>> kept(p.nb), full(p.nb);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* b = boxes + 6 * i;
    for (int k = b[2] / band; k <= (b[3] - 1) / band && k < p.nb; ++k) kept[k].push_back((int32_t)i);
    const int y1 = std::min(H, b[0] + tile);
    for (int k = b[0] / band; k <= (y1 - 1) / band && k < p.nb; ++k) full[k].push_back((int32_t)i);
  }
  // ascending patch order within a band: the gather's summation order
  p.kept_ptr.push_back(0);
  p.full_ptr.push_back(0);
  for (int k = 0; k < p.nb; ++k) {
    p.kept_idx.insert(p.kept_idx.end(), kept[k].begin(), kept[k].end());
    p.kept_ptr.push_back((offset_t)p.kept_idx.size());
    p.full_idx.insert(p.full_idx.end(), full[k].begin(), full[k].end());
    p.full_ptr.push_back((offset_t)p.full_idx.size());
  }
  return p;
}

constexpr int kPrefetch = 16;  // patches ahead: ~8 kept rows each, a few hundred ns of loads

// zden: max(Z, eps) of the plan (H, W), from stitch_band_weights: Z depends on the geometry
// alone, so a call adds only S and each output is stitch_normalise(S, zden).
// kWeights: the same walk summing the weights alone (w, not w * patch: the same terms in the
// same order, w * 1 being exact), written to out floored at eps; that is how
// stitch_band_weights builds zden, so the two cannot drift apart.
template <typename T, bool kWeights>
static void band_pass(const T* patches, int C, int tile, int H, int W, const int* boxes,
                      int band, int nb, const offset_t* kept_ptr, const int* kept_idx,
                      const offset_t* full_ptr, const int* full_idx, const T* hann, T eps, T* out,
                      T* cut, const T* zden) {
  const long plane = (long)tile * tile;
#pragma omp parallel
  {
    std::vector<T> S((size_t)band * W);
#pragma omp for collapse(2) schedule(static)
    for (int c = 0; c < C; ++c)
      for (int k = 0; k < nb; ++k) {
        const int ya = k * band, yb = std::min(H, ya + band);
        std::fill(S.begin(), S.end(), T(0));
        for (offset_t j = kept_ptr[k]; j < kept_ptr[k + 1]; ++j) {
          const int n = kept_idx[j];
          const int* b = boxes + 6L * n;
          const int y0 = std::max(ya, b[2]), y1 = std::min(yb, b[3]);
          const T* hy = hann + (long)(b[3] - b[2]) * tile - b[2];
          const T* hx = hann + (long)(b[5] - b[4]) * tile - b[4];
          // (no patches in kWeights mode: nothing is read through src)
          const T* src = kWeights ? nullptr : patches + ((long)n * C + c) * plane - (long)b[0] * tile - b[1];
          if (!kWeights && j + kPrefetch < kept_ptr[k + 1]) {  // a few patches ahead: its kept rows
            const int m = kept_idx[j + kPrefetch];
            const int* bm = boxes + 6L * m;
            const T* pm = patches + ((long)m * C + c) * plane - (long)bm[0] * tile + (bm[4] - bm[1]);
            for (int y = std::max(ya, bm[2]), ye = std::min(yb, bm[3]); y < ye; ++y)
              __builtin_prefetch(pm + (long)y * tile);
          }
          for (int y = y0; y < y1; ++y) {
            const T wy = hy[y];
            T* __restrict s = &S[(size_t)(y - ya) * W];
            if constexpr (kWeights) {
              for (int x = b[4]; x < b[5]; ++x) s[x] += floored_weight<T>(wy, hx[x], eps);
            } else {
              const T* row = src + (long)y * tile;
#pragma omp simd
              for (int x = b[4]; x < b[5]; ++x) s[x] += floored_weight<T>(wy, hx[x], eps) * row[x];
            }
          }
        }
        T* o = out + ((long)c * H + ya) * W;
        const long m = (long)(yb - ya) * W;
        if (kWeights) {
          for (long i = 0; i < m; ++i) o[i] = S[i] > eps ? S[i] : eps;
          continue;
        }
        const T* zd = zden + (long)ya * W;
        for (long i = 0; i < m; ++i) o[i] = stitch_normalise<T>(S[i], zd[i], eps);
        if (cut == nullptr) continue;
        // fused cut: this band's rows of the finished image go straight into every patch
        // whose tile meets the band (other bands write that patch's other rows)
        for (offset_t j = full_ptr[k]; j < full_ptr[k + 1]; ++j) {
          const int n = full_idx[j];
          const int* b = boxes + 6L * n;
          const int y0 = std::max(ya, b[0]), y1 = std::min(yb, b[0] + tile);
          T* dst = cut + ((long)n * C + c) * plane;
          for (int y = y0; y < y1; ++y)
            std::copy(o + (long)(y - ya) * W + b[1], o + (long)(y - ya) * W + b[1] + tile,
                      dst + (long)(y - b[0]) * tile);
        }
      }
  }
}

template <typename T>
void stitch_band_cpu(const T* patches, int C, int tile, int H, int W, const int* boxes,
                     int band, int nb, const offset_t* kept_ptr, const int* kept_idx,
                     const offset_t* full_ptr, const int* full_idx, const T* hann, T eps, T* out,
                     T* cut, const T* zden) {
  if (zden == nullptr) throw std::invalid_argument("stitch_band_cpu: zden is required");
  band_pass<T, false>(patches, C, tile, H, W, boxes, band, nb, kept_ptr, kept_idx, full_ptr,
                      full_idx, hann, eps, out, cut, zden);
}

template <typename T>
void stitch_band_weights(int tile, int H, int W, const int* boxes, int band, int nb,
                         const offset_t* kept_ptr, const int* kept_idx, const T* hann, T eps, T* zden) {
  band_pass<T, true>(nullptr, 1, tile, H, W, boxes, band, nb, kept_ptr, kept_idx, nullptr, nullptr,
                     hann, eps, zden, nullptr, nullptr);
}

template void stitch_band_cpu<float>(const float*, int, int, int, int, const int*, int, int,
                                     const offset_t*, const int*, const offset_t*, const int*,
                                     const float*, float, float*, float*, const float*);
template void stitch_band_cpu<double>(const double*, int, int, int, int, const int*, int, int,
                                      const offset_t*, const int*, const offset_t*, const int*,
                                      const double*, double, double*, double*, const double*);
template void stitch_band_weights<float>(int, int, int, const int*, int, int, const offset_t*,
                                         const int*, const float*, float, float*);
template void stitch_band_weights<double>(int, int, int, const int*, int, int, const offset_t*,
                                          const int*, const double*, double, double*);

}  // namespace fastds
