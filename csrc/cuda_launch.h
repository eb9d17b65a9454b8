#pragma once
#include <cstdint>
#include <string>

namespace fastds {
void stitch_cuda_launch(int dtype_bits, uintptr_t patches, int C, int tile, int H, int W,
                        uintptr_t boxes, uintptr_t cell_ptr, uintptr_t cell_idx, int cell,
                        int ncx, uintptr_t hann, double eps, uintptr_t out, uintptr_t stream);
void fused_step_cuda_launch(int dtype_bits, uintptr_t m, uintptr_t x, uintptr_t noise,
                            uintptr_t x0_prev, uintptr_t x0_out, uintptr_t out, long n,
                            uintptr_t coef, int clip_on, double clip, uintptr_t stream);
// "" when the driver and a device can run the built kernels, else why not.
std::string probe_cuda();
}  // namespace fastds
