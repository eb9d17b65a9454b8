// OpenMP fused sampler step: one read of each input, one write of each output.
#include "step_cpu.h"

#include <algorithm>

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

// Normals are drawn a chunk at a time into a stack buffer by a branch-free loop (it
// vectorises), then the update runs over the chunk as in fused_step_cpu: one pass over memory.
constexpr long kNoiseChunk = 512;  // a multiple of 4: chunks start on a counter boundary

// Built for the baseline ISA and for AVX2/AVX-512 (8/16 lanes and packed 32x32->64 multiplies
// for Philox), picked at load time by the CPU it runs on.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void philox_normals(float* z, long quads, unsigned long long seed, unsigned long long first) {
#pragma omp simd
  for (long j = 0; j < quads; ++j) philox_normal4(seed, first + (unsigned long long)j, z + 4 * j);
}

template <typename T>
void fused_step_rng_cpu(const T* m, const T* x, const T* x0_prev, T* x0_out, T* out, long n,
                        const T* coef, int clip_on, T clip, unsigned long long seed, long step) {
  T c[kStepCoefs];
  for (int k = 0; k < kStepCoefs; ++k) c[k] = coef[k];
  // element i of this step is normal i % 4 of counter (step * n4 + i) / 4
  const unsigned long long base = (unsigned long long)step * (unsigned long long)noise_width(n) / 4;
  const long chunks = (n + kNoiseChunk - 1) / kNoiseChunk;
#pragma omp parallel
  {
    alignas(64) float z[kNoiseChunk];
#pragma omp for schedule(static)
    for (long b = 0; b < chunks; ++b) {
      const long i0 = b * kNoiseChunk, len = std::min(kNoiseChunk, n - i0);
      philox_normals(z, (len + 3) / 4, seed, base + (unsigned long long)(i0 / 4));
      for (long j = 0; j < len; ++j) {
        const long i = i0 + j;
        out[i] = fused_step_value<T>(m[i], x[i], (T)z[j], x0_prev ? x0_prev[i] : T(0), c, clip_on,
                                     clip, x0_out ? x0_out + i : nullptr);
      }
    }
  }
}

template void fused_step_rng_cpu<float>(const float*, const float*, const float*, float*, float*,
                                        long, const float*, int, float, unsigned long long, long);
template void fused_step_rng_cpu<double>(const double*, const double*, const double*, double*,
                                         double*, long, const double*, int, double,
                                         unsigned long long, long);

template void fused_step_cpu<float>(const float*, const float*, const float*, const float*,
                                    float*, float*, long, const float*, int, float);
template void fused_step_cpu<double>(const double*, const double*, const double*,
                                     const double*, double*, double*, long, const double*,
                                     int, double);

}  // namespace fastds
