// pybind11 module fastds._C: the CPU kernels. Arrays arrive as numpy (torch CPU tensors are
// passed through .numpy(), zero-copy); the Python wrappers in fastds/ validate shapes and
// dtypes, so these functions only check what would otherwise corrupt memory.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <omp.h>

#include <stdexcept>
#include <string>

#include "step_cpu.h"
#include "stitch_cpu.h"

namespace py = pybind11;
using namespace fastds;

template <typename T>
using carr = py::array_t<T, py::array::c_style | py::array::forcecast>;

static py::tuple plan_py(carr<int64_t> starts, int H, int W, int tile, int halo, int cell) {
  if (starts.ndim() != 2 || starts.shape(1) != 2)
    throw std::invalid_argument("starts must have shape (N, 2)");
  StitchPlan p = build_stitch_plan(starts.data(), starts.shape(0), H, W, tile, halo, cell);
  auto boxes = carr<int32_t>({(py::ssize_t)starts.shape(0), (py::ssize_t)6});
  std::copy(p.boxes.begin(), p.boxes.end(), boxes.mutable_data());
  auto ptr = carr<int32_t>((py::ssize_t)p.cell_ptr.size());
  std::copy(p.cell_ptr.begin(), p.cell_ptr.end(), ptr.mutable_data());
  auto idx = carr<int32_t>((py::ssize_t)p.cell_idx.size());
  std::copy(p.cell_idx.begin(), p.cell_idx.end(), idx.mutable_data());
  return py::make_tuple(boxes, ptr, idx, p.ncx);
}

// The shape checks every stitch entry point makes: (N, C, tile, tile) patches, one plan box
// per patch, a (C, H, W) output.
template <typename P, typename B, typename O>
static void check_stitch(const P& patches, const B& boxes, const O& out, int& C, int& tile,
                         int& H, int& W) {
  if (patches.ndim() != 4) throw std::invalid_argument("patches must be (N, C, tile, tile)");
  if (out.ndim() != 3) throw std::invalid_argument("out must be (C, H, W)");
  C = (int)patches.shape(1);
  tile = (int)patches.shape(2);
  H = (int)out.shape(1);
  W = (int)out.shape(2);
  if (out.shape(0) != C) throw std::invalid_argument("out channels differ from patches'");
  if (boxes.shape(0) != patches.shape(0)) throw std::invalid_argument("plan/patch count differ");
}

template <typename T, bool Pixelwise>
static void stitch_py(carr<T> patches, carr<int32_t> boxes, carr<int32_t> ptr,
                      carr<int32_t> idx, int cell, int ncx, carr<T> hann, double eps,
                      py::array_t<T, py::array::c_style> out) {
  int C, tile, H, W;
  check_stitch(patches, boxes, out, C, tile, H, W);
  const T* pp = patches.data();
  T* op = out.mutable_data();
  py::gil_scoped_release nogil;
  auto fn = Pixelwise ? &stitch_pixelwise_cpu<T> : &stitch_cpu<T>;
  fn(pp, C, tile, H, W, boxes.data(), ptr.data(), idx.data(), cell, ncx, hann.data(), (T)eps, op);
}

static py::tuple band_plan_py(carr<int32_t> boxes, int H, int tile, int band) {
  if (boxes.ndim() != 2 || boxes.shape(1) != 6) throw std::invalid_argument("boxes must be (N, 6)");
  BandPlan p = build_band_plan(boxes.data(), boxes.shape(0), H, tile, band);
  auto arr = [](const std::vector<int32_t>& v) {
    auto a = carr<int32_t>((py::ssize_t)v.size());
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  return py::make_tuple(p.nb, arr(p.kept_ptr), arr(p.kept_idx), arr(p.full_ptr), arr(p.full_idx));
}

// No forcecast on the hot arrays: a wrong dtype or layout is an error, not a silent copy.
template <typename T>
using exact = py::array_t<T, py::array::c_style>;

template <typename T>
static void stitch_band_py(exact<T> patches, exact<int32_t> boxes, int band, int nb,
                           exact<int32_t> kp, exact<int32_t> ki, exact<int32_t> fp,
                           exact<int32_t> fi, exact<T> hann, double eps, exact<T> out,
                           py::object cut, exact<T> zden) {
  int C, tile, H, W;
  check_stitch(patches, boxes, out, C, tile, H, W);
  if (kp.size() != nb + 1 || fp.size() != nb + 1) throw std::invalid_argument("band plan size");
  T* cp = nullptr;
  exact<T> c;
  if (!cut.is_none()) {
    c = cut.cast<exact<T>>();
    if (c.size() != patches.size()) throw std::invalid_argument("cut must be shaped like patches");
    cp = c.mutable_data();
  }
  if (zden.ndim() != 2 || zden.shape(0) != H || zden.shape(1) != W)
    throw std::invalid_argument("zden must be (H, W) like the image");
  const T* zp = zden.data();
  const T* pp = patches.data();
  T* op = out.mutable_data();
  py::gil_scoped_release nogil;
  stitch_band_cpu<T>(pp, C, tile, H, W, boxes.data(), band, nb, kp.data(), ki.data(), fp.data(),
                     fi.data(), hann.data(), (T)eps, op, cp, zp);
}

template <typename T>
static void band_weights_py(exact<int32_t> boxes, int tile, int band, int nb, exact<int32_t> kp,
                            exact<int32_t> ki, exact<T> hann, double eps, exact<T> zden) {
  if (boxes.ndim() != 2 || boxes.shape(1) != 6) throw std::invalid_argument("boxes must be (N, 6)");
  if (zden.ndim() != 2) throw std::invalid_argument("zden must be (H, W)");
  if (kp.size() != nb + 1) throw std::invalid_argument("band plan size");
  if (hann.ndim() != 2 || hann.shape(0) != tile + 1 || hann.shape(1) != tile)
    throw std::invalid_argument("hann must be (tile + 1, tile)");
  const int H = (int)zden.shape(0), W = (int)zden.shape(1);
  if ((long)nb * band < H) throw std::invalid_argument("band plan does not cover the image");
  T* zp = zden.mutable_data();
  py::gil_scoped_release nogil;
  stitch_band_weights<T>(tile, H, W, boxes.data(), band, nb, kp.data(), ki.data(), hann.data(),
                         (T)eps, zp);
}

template <typename T>
static void step_py(carr<T> m, carr<T> x, py::object noise, py::object x0_prev,
                    py::object x0_out, py::array_t<T, py::array::c_style> out, carr<T> coef,
                    int clip_on, double clip) {
  const long n = (long)x.size();
  if (m.size() != n || out.size() != n)
    throw std::invalid_argument("fused_step: model output, x_t and out differ in size");
  if (coef.size() != 6) throw std::invalid_argument("fused_step: coef must hold 6 values");
  carr<T> z, xp;
  py::array_t<T, py::array::c_style> xo;
  const T *zp = nullptr, *xpp = nullptr;
  T* xop = nullptr;
  if (!noise.is_none()) { z = noise.cast<carr<T>>(); if (z.size() != n) throw std::invalid_argument("noise size"); zp = z.data(); }
  if (!x0_prev.is_none()) { xp = x0_prev.cast<carr<T>>(); if (xp.size() != n) throw std::invalid_argument("x0_prev size"); xpp = xp.data(); }
  if (!x0_out.is_none()) { xo = x0_out.cast<py::array_t<T, py::array::c_style>>(); if (xo.size() != n) throw std::invalid_argument("x0_out size"); xop = xo.mutable_data(); }
  const T* mp = m.data();
  const T* xpx = x.data();
  const T* cp = coef.data();
  T* op = out.mutable_data();
  py::gil_scoped_release nogil;
  fused_step_cpu<T>(mp, xpx, zp, xpp, xop, op, n, cp, clip_on, (T)clip);
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fastds CPU kernels (OpenMP)";
  mod.def("build_stitch_plan", &plan_py, py::arg("starts"), py::arg("H"), py::arg("W"),
          py::arg("tile"), py::arg("halo"), py::arg("cell"));
  mod.def("build_band_plan", &band_plan_py, py::arg("boxes"), py::arg("H"), py::arg("tile"),
          py::arg("band"));
  mod.def("stitch_band_f32", &stitch_band_py<float>);
  mod.def("stitch_band_f64", &stitch_band_py<double>);
  mod.def("stitch_band_weights_f32", &band_weights_py<float>);
  mod.def("stitch_band_weights_f64", &band_weights_py<double>);
  mod.def("stitch_f32", &stitch_py<float, false>);
  mod.def("stitch_f64", &stitch_py<double, false>);
  mod.def("stitch_pixelwise_f32", &stitch_py<float, true>);
  mod.def("stitch_pixelwise_f64", &stitch_py<double, true>);
  mod.def("fused_step_f32", &step_py<float>);
  mod.def("fused_step_f64", &step_py<double>);
  mod.def("omp_max_threads", []() { return omp_get_max_threads(); });
}
