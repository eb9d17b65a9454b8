#pragma once

namespace fastds {
template <typename T>
void fused_step_cpu(const T* m, const T* x, const T* noise, const T* x0_prev, T* x0_out,
                    T* out, long n, const T* coef, int clip_on, T clip);
}  // namespace fastds
