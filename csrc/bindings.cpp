// pybind11 module fastds._C: the CPU kernels. Arrays arrive as numpy (torch CPU tensors are
// passed through .numpy(), zero-copy); the Python wrappers in fastds/ validate shapes and
// dtypes, so these functions only check what would otherwise corrupt memory.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <omp.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "step.h"
#include "step_cpu.h"
#include "stitch_cpu.h"

namespace py = pybind11;
using namespace fastds;

// Every array argument is taken as it is: the exact dtype and C-contiguous, or an error that
// names it. pybind11 would otherwise convert a mismatched array into a temporary copy, and a
// kernel writing its output into that copy loses the result silently. The Python wrappers
// pass exactly these; the checks guard direct callers of fastds._C.
template <typename T>
using exact = py::array_t<T, py::array::c_style>;

template <typename T>
static exact<T> take(py::handle obj, const char* op, const char* name, bool writable) {
  const char* want = std::is_same<T, float>::value    ? "float32"
                     : std::is_same<T, double>::value ? "float64"
                     : std::is_same<T, int32_t>::value ? "int32"
                                                       : "int64";
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(op) + ": " + name + " must be a numpy array of " + want);
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(op) + ": " + name + " must be " + want + ", got " +
                         std::string(py::str(arr.dtype())) + " (no silent conversion)");
  if (!(arr.flags() & py::array::c_style))
    throw py::value_error(std::string(op) + ": " + name + " must be C-contiguous (a strided "
                          "view would be copied, and the copy written instead)");
  if (writable && !arr.writeable())
    throw py::value_error(std::string(op) + ": " + name + " is read-only");
  return py::reinterpret_borrow<exact<T>>(obj);
}


// numpy's int64 is the plan's offset_t (stitch.h spells it long long for NVRTC)
static_assert(sizeof(offset_t) == sizeof(int64_t), "offset_t must be 64-bit");
static const offset_t* offsets(const exact<int64_t>& a) {
  return reinterpret_cast<const offset_t*>(a.data());
}

static py::tuple plan_py(py::handle starts_obj, int H, int W, int tile, int halo, int cell) {
  const char* op = "build_stitch_plan";
  auto starts = take<int64_t>(starts_obj, op, "starts", false);
  if (starts.ndim() != 2 || starts.shape(1) != 2)
    throw std::invalid_argument("starts must have shape (N, 2)");
  StitchPlan p = build_stitch_plan(starts.data(), starts.shape(0), H, W, tile, halo, cell);
  auto boxes = exact<int32_t>({(py::ssize_t)starts.shape(0), (py::ssize_t)6});
  std::copy(p.boxes.begin(), p.boxes.end(), boxes.mutable_data());
  auto ptr = exact<int64_t>((py::ssize_t)p.cell_ptr.size());  // offset_t values
  std::copy(p.cell_ptr.begin(), p.cell_ptr.end(), ptr.mutable_data());
  auto idx = exact<int32_t>((py::ssize_t)p.cell_idx.size());
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
  if (boxes.ndim() != 2 || boxes.shape(1) != 6) throw std::invalid_argument("boxes must be (N, 6)");
  C = (int)patches.shape(1);
  tile = (int)patches.shape(2);
  H = (int)out.shape(1);
  W = (int)out.shape(2);
  if (patches.shape(3) != tile) throw std::invalid_argument("patches must be square");
  if (out.shape(0) != C) throw std::invalid_argument("out channels differ from patches'");
  if (boxes.shape(0) != patches.shape(0)) throw std::invalid_argument("plan/patch count differ");
}

template <typename T>
static void check_hann(const exact<T>& hann, int tile) {
  if (hann.ndim() != 2 || hann.shape(0) != tile + 1 || hann.shape(1) != tile)
    throw std::invalid_argument("hann must be (tile + 1, tile)");
}

template <typename T, bool Pixelwise>
static void stitch_py(py::handle patches_obj, py::handle boxes_obj, py::handle ptr_obj,
                      py::handle idx_obj, int cell, int ncx, py::handle hann_obj, double eps,
                      py::handle out_obj) {
  const char* op = Pixelwise ? "stitch_pixelwise" : "stitch";
  auto patches = take<T>(patches_obj, op, "patches", false);
  auto boxes = take<int32_t>(boxes_obj, op, "boxes", false);
  auto ptr = take<int64_t>(ptr_obj, op, "cell_ptr", false);
  auto idx = take<int32_t>(idx_obj, op, "cell_idx", false);
  auto hann = take<T>(hann_obj, op, "hann", false);
  auto out = take<T>(out_obj, op, "out", true);
  int C, tile, H, W;
  check_stitch(patches, boxes, out, C, tile, H, W);
  check_hann(hann, tile);
  if (cell < 1 || ncx != (W + cell - 1) / cell ||
      ptr.size() != (py::ssize_t)(((H + cell - 1) / cell) * (long)ncx + 1))
    throw std::invalid_argument("cell_ptr does not match the plan's cell grid");
  const T* pp = patches.data();
  T* op_ = out.mutable_data();
  py::gil_scoped_release nogil;
  auto fn = Pixelwise ? &stitch_pixelwise_cpu<T> : &stitch_cpu<T>;
  fn(pp, C, tile, H, W, boxes.data(), offsets(ptr), idx.data(), cell, ncx, hann.data(), (T)eps, op_);
}

static py::tuple band_plan_py(py::handle boxes_obj, int H, int tile, int band) {
  const char* op = "build_band_plan";
  auto boxes = take<int32_t>(boxes_obj, op, "boxes", false);
  if (boxes.ndim() != 2 || boxes.shape(1) != 6) throw std::invalid_argument("boxes must be (N, 6)");
  BandPlan p = build_band_plan(boxes.data(), boxes.shape(0), H, tile, band);
  auto arr = [](const auto& v) {
    using V = typename std::decay_t<decltype(v)>::value_type;
    using A = std::conditional_t<sizeof(V) == 8, int64_t, V>;  // offset_t -> numpy int64
    auto a = exact<A>((py::ssize_t)v.size());
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  return py::make_tuple(p.nb, arr(p.kept_ptr), arr(p.kept_idx), arr(p.full_ptr), arr(p.full_idx));
}

template <typename T>
static void stitch_band_py(py::handle patches_obj, py::handle boxes_obj, int band, int nb,
                           py::handle kp_obj, py::handle ki_obj, py::handle fp_obj,
                           py::handle fi_obj, py::handle hann_obj, double eps, py::handle out_obj,
                           py::object cut_obj, py::handle zden_obj) {
  const char* op = "stitch_band";
  auto patches = take<T>(patches_obj, op, "patches", false);
  auto boxes = take<int32_t>(boxes_obj, op, "boxes", false);
  auto kp = take<int64_t>(kp_obj, op, "kept_ptr", false);
  auto ki = take<int32_t>(ki_obj, op, "kept_idx", false);
  auto fp = take<int64_t>(fp_obj, op, "full_ptr", false);
  auto fi = take<int32_t>(fi_obj, op, "full_idx", false);
  auto hann = take<T>(hann_obj, op, "hann", false);
  auto out = take<T>(out_obj, op, "out", true);
  auto zden = take<T>(zden_obj, op, "zden", false);
  int C, tile, H, W;
  check_stitch(patches, boxes, out, C, tile, H, W);
  check_hann(hann, tile);
  if (kp.size() != nb + 1 || fp.size() != nb + 1) throw std::invalid_argument("band plan size");
  if ((long)nb * band < H) throw std::invalid_argument("band plan does not cover the image");
  T* cp = nullptr;
  exact<T> c;
  if (!cut_obj.is_none()) {
    c = take<T>(cut_obj, op, "cut", true);
    if (c.ndim() != 4 || c.shape(0) != patches.shape(0) || c.shape(1) != C ||
        c.shape(2) != tile || c.shape(3) != tile)
      throw std::invalid_argument("cut must be shaped like patches");
    cp = c.mutable_data();
  }
  if (zden.ndim() != 2 || zden.shape(0) != H || zden.shape(1) != W)
    throw std::invalid_argument("zden must be (H, W) like the image");
  const T* zp = zden.data();
  const T* pp = patches.data();
  T* op_ = out.mutable_data();
  py::gil_scoped_release nogil;
  stitch_band_cpu<T>(pp, C, tile, H, W, boxes.data(), band, nb, offsets(kp), ki.data(), offsets(fp),
                     fi.data(), hann.data(), (T)eps, op_, cp, zp);
}

template <typename T>
static void band_weights_py(py::handle boxes_obj, int tile, int band, int nb, py::handle kp_obj,
                            py::handle ki_obj, py::handle hann_obj, double eps,
                            py::handle zden_obj) {
  const char* op = "stitch_band_weights";
  auto boxes = take<int32_t>(boxes_obj, op, "boxes", false);
  auto kp = take<int64_t>(kp_obj, op, "kept_ptr", false);
  auto ki = take<int32_t>(ki_obj, op, "kept_idx", false);
  auto hann = take<T>(hann_obj, op, "hann", false);
  auto zden = take<T>(zden_obj, op, "zden", true);
  if (boxes.ndim() != 2 || boxes.shape(1) != 6) throw std::invalid_argument("boxes must be (N, 6)");
  if (zden.ndim() != 2) throw std::invalid_argument("zden must be (H, W)");
  if (kp.size() != nb + 1) throw std::invalid_argument("band plan size");
  check_hann(hann, tile);
  const int H = (int)zden.shape(0), W = (int)zden.shape(1);
  if ((long)nb * band < H) throw std::invalid_argument("band plan does not cover the image");
  T* zp = zden.mutable_data();
  py::gil_scoped_release nogil;
  stitch_band_weights<T>(tile, H, W, boxes.data(), band, nb, offsets(kp), ki.data(), hann.data(),
                         (T)eps, zp);
}

// The operands of one fused step, each taken exactly (see take) and checked against x's size;
// absent optional ones stay null.
template <typename T>
struct StepOperands {
  exact<T> m, x, out, coef, z, xp, xo;
  const T *zp = nullptr, *xpp = nullptr;
  T* xop = nullptr;
  long n = 0;
};

template <typename T>
static StepOperands<T> step_operands(const char* op, py::handle m, py::handle x, py::object noise,
                                     py::object x0_prev, py::object x0_out, py::handle out,
                                     py::handle coef) {
  StepOperands<T> s;
  s.m = take<T>(m, op, "m", false);
  s.x = take<T>(x, op, "x", false);
  s.out = take<T>(out, op, "out", true);
  s.coef = take<T>(coef, op, "coef", false);
  s.n = (long)s.x.size();
  if (s.m.size() != s.n || s.out.size() != s.n)
    throw std::invalid_argument(std::string(op) + ": model output, x_t and out differ in size");
  if (s.coef.size() != kStepCoefs) throw std::invalid_argument(std::string(op) + ": coef must hold 6 values");
  auto optional = [&](py::object obj, const char* name, bool writable, exact<T>& keep) {
    if (obj.is_none()) return false;
    keep = take<T>(obj, op, name, writable);
    if (keep.size() != s.n)
      throw std::invalid_argument(std::string(op) + ": " + name + " differs in size from x");
    return true;
  };
  if (optional(noise, "noise", false, s.z)) s.zp = s.z.data();
  if (optional(x0_prev, "x0_prev", false, s.xp)) s.xpp = s.xp.data();
  if (optional(x0_out, "x0_out", true, s.xo)) s.xop = s.xo.mutable_data();
  return s;
}

template <typename T>
static void step_py(py::handle m_obj, py::handle x_obj, py::object noise_obj,
                    py::object x0_prev_obj, py::object x0_out_obj, py::handle out_obj,
                    py::handle coef_obj, int clip_on, double clip) {
  auto s = step_operands<T>("fused_step", m_obj, x_obj, noise_obj, x0_prev_obj, x0_out_obj, out_obj,
                            coef_obj);
  T* op_ = s.out.mutable_data();
  py::gil_scoped_release nogil;
  fused_step_cpu<T>(s.m.data(), s.x.data(), s.zp, s.xpp, s.xop, op_, s.n, s.coef.data(), clip_on,
                    (T)clip);
}

// fused_step with the noise drawn in the kernel (seed, step): see fused_step_rng_cpu.
template <typename T>
static void step_rng_py(py::handle m_obj, py::handle x_obj, py::object x0_prev_obj,
                        py::object x0_out_obj, py::handle out_obj, py::handle coef_obj,
                        int clip_on, double clip, int64_t seed, int64_t step) {
  if (step < 0) throw std::invalid_argument("fused_step_rng: step must be >= 0");
  auto s = step_operands<T>("fused_step_rng", m_obj, x_obj, py::none(), x0_prev_obj, x0_out_obj,
                            out_obj, coef_obj);
  T* op_ = s.out.mutable_data();
  py::gil_scoped_release nogil;
  fused_step_rng_cpu<T>(s.m.data(), s.x.data(), s.xpp, s.xop, op_, s.n, s.coef.data(), clip_on,
                        (T)clip, (unsigned long long)seed, (long)step);
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
  mod.def("fused_step_rng_f32", &step_rng_py<float>);
  mod.def("fused_step_rng_f64", &step_rng_py<double>);
  mod.def("philox_normal4", [](int64_t seed, py::array_t<int64_t, py::array::c_style> counters) {
    auto out = exact<float>({(py::ssize_t)counters.size(), (py::ssize_t)4});
    const int64_t* c = counters.data();
    float* p = out.mutable_data();
    for (py::ssize_t i = 0; i < counters.size(); ++i)
      philox_normal4((unsigned long long)seed, (unsigned long long)c[i], p + 4 * i);
    return out;
  }, "Triton's tl.randn4x(seed, counter) stream on the host: (N,) counters -> (N, 4) normals");
  mod.def("omp_max_threads", []() { return omp_get_max_threads(); });
}
