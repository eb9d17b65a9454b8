#pragma once

namespace fastds {
template <typename T>
void fused_step_cpu(const T* m, const T* x, const T* noise, const T* x0_prev, T* x0_out,
                    T* out, long n, const T* coef, int clip_on, T clip);

// The same update with the noise drawn inside the loop: z_i = philox_normal(seed, step·n + i)
// (step.h), the stream of the Triton kernel, in parallel and without a noise buffer.
template <typename T>
void fused_step_rng_cpu(const T* m, const T* x, const T* x0_prev, T* x0_out, T* out, long n,
                        const T* coef, int clip_on, T clip, unsigned long long seed, long step);
}  // namespace fastds
