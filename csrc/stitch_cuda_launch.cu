// Host launchers for the CUDA kernels, compiled by nvcc into fastds._C_cuda.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "stitch_cuda.cu"
#include "step.h"
#include "cuda_launch.h"

namespace fastds {

static void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastds CUDA ") + what + ": " + cudaGetErrorString(err));
}

// Launch on the device that owns the output buffer, whatever device is current (on a
// multi-GPU machine the caller's current device need not be the tensors'), and put the
// caller's device back afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(uintptr_t ptr) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    cudaPointerAttributes attr{};
    check(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)),
          "cudaPointerGetAttributes");
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      throw std::runtime_error("fastds CUDA: the output pointer is not device memory");
    if (attr.device != previous_) {
      check(cudaSetDevice(attr.device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// The kernels exist for float32 and float64 only; any other width would be read as one of
// them, out of bounds. The grid's x dimension holds at most 2^31 - 1 blocks.
static unsigned checked_blocks(int dtype_bits, long n, int threads, const char* what) {
  if (dtype_bits != 32 && dtype_bits != 64)
    throw std::invalid_argument(std::string("fastds CUDA ") + what + ": dtype_bits must be 32 "
                                "(float32) or 64 (float64), got " + std::to_string(dtype_bits));
  const long blocks = (n + threads - 1) / threads;
  if (blocks > 2147483647L)
    throw std::invalid_argument(std::string("fastds CUDA ") + what + ": " + std::to_string(n) +
                                " elements exceed one launch's grid");
  return (unsigned)blocks;
}

void stitch_cuda_launch(int dtype_bits, uintptr_t patches, int C, int tile, int H, int W,
                        uintptr_t boxes, uintptr_t cell_ptr, uintptr_t cell_idx, int cell,
                        int ncx, uintptr_t hann, double eps, uintptr_t out, uintptr_t stream) {
  const long total = (long)C * H * W;
  const int threads = 256;
  const unsigned blocks = checked_blocks(dtype_bits, total, threads, "stitch");
  DeviceGuard guard(out);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype_bits == 32) {
    fastds_stitch_f32<<<blocks, threads, 0, s>>>(
        (const float*)patches, C, tile, H, W, (const int*)boxes, (const fastds::offset_t*)cell_ptr,
        (const int*)cell_idx, cell, ncx, (const float*)hann, (float)eps, (float*)out);
  } else {
    fastds_stitch_f64<<<blocks, threads, 0, s>>>(
        (const double*)patches, C, tile, H, W, (const int*)boxes, (const fastds::offset_t*)cell_ptr,
        (const int*)cell_idx, cell, ncx, (const double*)hann, eps, (double*)out);
  }
  check(cudaGetLastError(), "stitch launch");
}

template <typename T>
__global__ void fused_step_kernel(const T* m, const T* x, const T* noise, const T* x0_prev,
                                  T* x0_out, T* out, long n, const T* coef, int clip_on,
                                  T clip) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = fused_step_value<T>(m[i], x[i], noise ? noise[i] : T(0),
                               x0_prev ? x0_prev[i] : T(0), coef, clip_on, clip,
                               x0_out ? x0_out + i : nullptr);
}

void fused_step_cuda_launch(int dtype_bits, uintptr_t m, uintptr_t x, uintptr_t noise,
                            uintptr_t x0_prev, uintptr_t x0_out, uintptr_t out, long n,
                            uintptr_t coef, int clip_on, double clip, uintptr_t stream) {
  const int threads = 256;
  const unsigned blocks = checked_blocks(dtype_bits, n, threads, "fused_step");
  DeviceGuard guard(out);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype_bits == 32)
    fused_step_kernel<float><<<blocks, threads, 0, s>>>(
        (const float*)m, (const float*)x, (const float*)noise, (const float*)x0_prev,
        (float*)x0_out, (float*)out, n, (const float*)coef, clip_on, (float)clip);
  else
    fused_step_kernel<double><<<blocks, threads, 0, s>>>(
        (const double*)m, (const double*)x, (const double*)noise, (const double*)x0_prev,
        (double*)x0_out, (double*)out, n, (const double*)coef, clip_on, clip);
  check(cudaGetLastError(), "fused step launch");
}

std::string probe_cuda() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess)
    return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err) +
           " (a driver older than the CUDA runtime this extension was built with?)";
  if (n == 0) return "no CUDA device";
  // The kernels' images must load on device 0: a build for another architecture fails here,
  // not at the first launch.
  cudaFuncAttributes attr{};
  err = cudaFuncGetAttributes(&attr, fastds_stitch_f32);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, fused_step_kernel<float>);
  if (err != cudaSuccess)
    return std::string("the kernels cannot run on this device: ") + cudaGetErrorString(err) +
           " (rebuild with FASTDS_CUDA_ARCHS set to its architecture)";
  return "";
}

}  // namespace fastds
