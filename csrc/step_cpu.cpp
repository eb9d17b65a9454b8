// OpenMP fused sampler step: one read of each input, one write of each output.
#include "step_cpu.h"

#include "step.h"

namespace fastds {

template <typename T>
void fused_step_cpu(const T* m, const T* x, const T* noise, const T* x0_prev, T* x0_out,
                    T* out, long n, const T* coef, int clip_on, T clip) {
  T c[kStepCoefs];
  for (int k = 0; k < kStepCoefs; ++k) c[k] = coef[k];
#pragma omp parallel for schedule(static)
  for (long i = 0; i < n; ++i)
    out[i] = fused_step_value<T>(m[i], x[i], noise ? noise[i] : T(0),
                                 x0_prev ? x0_prev[i] : T(0), c, clip_on, clip,
                                 x0_out ? x0_out + i : nullptr);
}

template void fused_step_cpu<float>(const float*, const float*, const float*, const float*,
                                    float*, float*, long, const float*, int, float);
template void fused_step_cpu<double>(const double*, const double*, const double*,
                                     const double*, double*, double*, long, const double*,
                                     int, double);

}  // namespace fastds
