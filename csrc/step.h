// One fused sampler update, per element, shared by the OpenMP CPU path (step_cpu.cpp)
// and the CUDA kernel (stitch_cuda_launch.cu); the Triton kernel in kernels/ implements
// the same formula. Every sampler fastds ships (DDPM ancestral, DDIM, DPM-Solver++ 2M) is
// linear in (x_t, model output, previous x0, noise) once its per-step coefficients are
// known, so one pass covers them all:
//   x0  = clip(a_x * x_t + a_m * m)                       (prediction type -> x0)
//   out = c0 * x0 + c1 * x_t + cp * x0_prev + sigma * z   (posterior / solver update)
// coef = {a_x, a_m, c0, c1, cp, sigma}; the host computes them in float64 per step
// (fastds/sampling/steps.py) and they live in a device tensor so CUDA graphs can replay.
#pragma once
#include "stitch.h"  // FASTDS_HD

namespace fastds {

constexpr int kStepCoefs = 6;

template <typename T>
FASTDS_HD T fused_step_value(T m, T x, T z, T x0_prev, const T* coef, int clip_on, T clip,
                             T* x0_out) {
  T x0 = coef[0] * x + coef[1] * m;
  if (clip_on) x0 = x0 < -clip ? -clip : (x0 > clip ? clip : x0);
  if (x0_out) *x0_out = x0;
  return coef[2] * x0 + coef[3] * x + coef[4] * x0_prev + coef[5] * z;
}

}  // namespace fastds
