// pybind11 module fastds._C_cuda: launchers that take raw device pointers (as integers),
// so the extension needs neither torch's nor CuPy's headers and serves both.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include "cuda_launch.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, mod) {
  mod.doc() = "fastds CUDA kernels (device pointers in, nothing allocated)";
  mod.def("stitch", [](int bits, uintptr_t patches, int C, int tile, int H, int W,
                       uintptr_t boxes, uintptr_t ptr, uintptr_t idx, int cell, int ncx,
                       uintptr_t hann, double eps, uintptr_t out, uintptr_t stream) {
    py::gil_scoped_release nogil;
    fastds::stitch_cuda_launch(bits, patches, C, tile, H, W, boxes, ptr, idx, cell, ncx, hann,
                               eps, out, stream);
  });
  mod.def("fused_step", [](int bits, uintptr_t m, uintptr_t x, uintptr_t noise,
                           uintptr_t x0_prev, uintptr_t x0_out, uintptr_t out, long n,
                           uintptr_t coef, int clip_on, double clip, uintptr_t stream) {
    py::gil_scoped_release nogil;
    fastds::fused_step_cuda_launch(bits, m, x, noise, x0_prev, x0_out, out, n, coef, clip_on,
                                   clip, stream);
  });
  mod.def("probe", []() { return fastds::probe_cuda(); });
  mod.def("device_count", []() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  });
}
