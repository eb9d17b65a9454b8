#pragma once
#include <cstdint>
#include <vector>

#include "stitch.h"  // offset_t

namespace fastds {

struct StitchPlan {
  int cell = 1, ncy = 0, ncx = 0;
  std::vector<int32_t> boxes;     // (N, 6), see stitch.h
  std::vector<offset_t> cell_ptr;  // (ncy*ncx + 1)
  std::vector<int32_t> cell_idx;
};

// Band-scatter plan: per band of `band` rows, the patches whose kept region meets it
// (kept_*) and those whose whole tile meets it (full_*, for the fused cut), ascending.
struct BandPlan {
  int band = 1, nb = 0;
  std::vector<offset_t> kept_ptr, full_ptr;
  std::vector<int32_t> kept_idx, full_idx;
};

BandPlan build_band_plan(const int32_t* boxes, int64_t n, int H, int tile, int band);

// out (C, H, W) = the stitched image; cut (N, C, tile, tile) or nullptr = its patches again;
// zden (H, W) = the plan's max(Z, eps) from stitch_band_weights (required: a call sums only S).
template <typename T>
void stitch_band_cpu(const T* patches, int C, int tile, int H, int W, const int* boxes,
                     int band, int nb, const offset_t* kept_ptr, const int* kept_idx,
                     const offset_t* full_ptr, const int* full_idx, const T* hann, T eps, T* out,
                     T* cut, const T* zden);

// zden (H, W) = max(Z, eps), Z the band kernel's sum of weights (same terms, same order).
template <typename T>
void stitch_band_weights(int tile, int H, int W, const int* boxes, int band, int nb,
                         const offset_t* kept_ptr, const int* kept_idx, const T* hann, T eps, T* zden);

StitchPlan build_stitch_plan(const int64_t* starts, int64_t n, int H, int W, int tile,
                             int halo, int cell);

template <typename T>
void stitch_cpu(const T* patches, int C, int tile, int H, int W, const int* boxes,
                const offset_t* cell_ptr, const int* cell_idx, int cell, int ncx, const T* hann,
                T eps, T* out);

template <typename T>
void stitch_pixelwise_cpu(const T* patches, int C, int tile, int H, int W, const int* boxes,
                          const offset_t* cell_ptr, const int* cell_idx, int cell, int ncx,
                          const T* hann, T eps, T* out);

}  // namespace fastds
