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

#if !defined(__CUDACC_RTC__)
#include <cmath>
#endif

// Host: always inlined, so the per-counter loop that calls it has no call inside and vectorises.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FASTDS_HD_FLAT FASTDS_HD
#else
#define FASTDS_HD_FLAT inline __attribute__((always_inline))
#endif

namespace fastds {

constexpr int kStepCoefs = 6;

// Float log and cos(2πu) as straight-line polynomials (Cephes' logf and sinf/cosf kernels, about
// 1 ulp): unlike libm calls they vectorise in the CPU loop, and the GPU build runs the same
// arithmetic. u is a turn fraction in [0, 1): reducing in turns (exact in float) instead of
// radians keeps the argument exact.
FASTDS_HD_FLAT float poly_logf(float x) {  // x > 0, normal
#if defined(__CUDA_ARCH__)
  int bits = __float_as_int(x);
#else
  int bits;
  __builtin_memcpy(&bits, &x, sizeof bits);
#endif
  int e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
#if defined(__CUDA_ARCH__)
  m = __int_as_float(bits);
#else
  __builtin_memcpy(&m, &bits, sizeof m);
#endif
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = (float)e;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// cos(2πu) and sin(2πu), u in [0, 1)
FASTDS_HD_FLAT void sincos_turns(float u, float* c_out, float* s_out) {
  const float q = (float)(int)(4.0f * u + 0.5f);  // nearest quarter turn, 0..4
  const float t = 6.283185307179586f * (u - 0.25f * q);  // in [-π/4, π/4], exact reduction
  const float z = t * t;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z
                  - 0.5f * z + 1.0f;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * t + t;
  const int k = ((int)q) & 3;  // angle t + kπ/2
  const float cv = (k & 1) ? s : c, sv = (k & 1) ? c : s;
  *c_out = ((k + 1) & 2) ? -cv : cv;  // cos: c, -s, -c, s
  *s_out = (k & 2) ? -sv : sv;        // sin: s, c, -s, -c
}

FASTDS_HD_FLAT float uint_to_uniform(unsigned v) {  // Triton's uint_to_uniform_float for 32 bits
  int i = (int)v;
  i = i < 0 ? ~i : i;
  return (float)i * 4.6566127342e-10f;
}

// Four standard normals from one Philox4x32-10 call: the stream of Triton's
// tl.randn4x(seed, counter) (triton/language/random.py). The seed keys it (low, high words),
// the 64-bit counter is (low, high, 0, 0); each pair of words becomes two uniforms and two
// Box-Muller normals (r cos θ, r sin θ). The fused step's element i of step s takes normal
// i mod 4 of counter (s·n₄ + i)/4, n₄ = n rounded up to a multiple of 4, on every backend,
// so CPU and GPU trajectories of one seed share their noise (up to the last bits of log and
// cos, computed here by polynomials and on the GPU by its math library).
FASTDS_HD_FLAT void philox_normal4(unsigned long long seed, unsigned long long counter, float* z) {
  unsigned c0 = (unsigned)counter, c1 = (unsigned)(counter >> 32), c2 = 0u, c3 = 0u;
  unsigned k0 = (unsigned)seed, k1 = (unsigned)(seed >> 32);
  // unrolled, so the host loop over counters has no inner control flow and vectorises
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    const unsigned long long pa = 0xD2511F53ull * c0, pb = 0xCD9E8D57ull * c2;
    const unsigned n0 = (unsigned)(pb >> 32) ^ c1 ^ k0;
    const unsigned n2 = (unsigned)(pa >> 32) ^ c3 ^ k1;
    c1 = (unsigned)pb;
    c3 = (unsigned)pa;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  float u1 = uint_to_uniform(c0), u3 = uint_to_uniform(c2);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  u3 = u3 > 1.0e-7f ? u3 : 1.0e-7f;
  const float r1 = sqrtf(-2.0f * poly_logf(u1)), r3 = sqrtf(-2.0f * poly_logf(u3));
  float ca, sa, cb, sb;
  sincos_turns(uint_to_uniform(c1), &ca, &sa);
  sincos_turns(uint_to_uniform(c3), &cb, &sb);
  z[0] = r1 * ca;
  z[1] = r1 * sa;
  z[2] = r3 * cb;
  z[3] = r3 * sb;
}

FASTDS_HD long long noise_width(long long n) { return (n + 3) / 4 * 4; }

template <typename T>
FASTDS_HD T fused_step_value(T m, T x, T z, T x0_prev, const T* coef, int clip_on, T clip,
                             T* x0_out) {
  T x0 = coef[0] * x + coef[1] * m;
  if (clip_on) x0 = x0 < -clip ? -clip : (x0 > clip ? clip : x0);
  if (x0_out) *x0_out = x0;
  return coef[2] * x0 + coef[3] * x + coef[4] * x0_prev + coef[5] * z;
}

}  // namespace fastds
