#pragma once
#include <cstdint>
#include <vector>

namespace fastds {

struct StitchPlan {
  int cell = 1, ncy = 0, ncx = 0;
  std::vector<int32_t> boxes;     // (N, 6), see stitch.h
  std::vector<int32_t> cell_ptr;  // (ncy*ncx + 1)
  std::vector<int32_t> cell_idx;
};

StitchPlan build_stitch_plan(const int64_t* starts, int64_t n, int H, int W, int tile,
                             int halo, int cell);

template <typename T>
void stitch_cpu(const T* patches, int C, int tile, int H, int W, const int* boxes,
                const int* cell_ptr, const int* cell_idx, int cell, int ncx, const T* hann,
                T eps, T* out);

template <typename T>
void stitch_pixelwise_cpu(const T* patches, int C, int tile, int H, int W, const int* boxes,
                          const int* cell_ptr, const int* cell_idx, int cell, int ncx,
                          const T* hann, T eps, T* out);

}  // namespace fastds
