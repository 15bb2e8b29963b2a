// Schemas of the apex4 ops, and the device-independent composite w4a4_linear.
// Device kernels register themselves in csrc/cpu and csrc/cuda; fake (meta)
// implementations for tracing live in torch_apex4/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"

namespace apex4 {

// The activation group size that matches a quantized weight: its scales fix
// the group count, hence the group size (None for one group, per channel).
std::optional<int64_t> weight_group_size(const at::Tensor& x, const at::Tensor& w_q,
                                         const at::Tensor& w_s) {
  TORCH_CHECK_VALUE(w_q.dim() == 2 && w_s.dim() == 2 && w_s.size(0) == w_q.size(0),
                    "apex4: a quantized linear expects w_q [N, Kp/2] and w_s [N, G], got ",
                    w_q.sizes(), " and ", w_s.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1, "apex4: a quantized linear expects x with a K dimension");
  const int64_t kp = w_q.size(1) * 2;
  const int64_t groups = w_s.size(1);
  TORCH_CHECK_VALUE(groups > 0 && kp % groups == 0, "apex4: w_s has ", groups,
                    " groups, which do not divide K = ", kp);
  const std::optional<int64_t> group_size =
      groups == 1 ? std::nullopt : std::optional<int64_t>(kp / groups);
  TORCH_CHECK_VALUE(padded_k(x.size(-1), group_size.value_or(0)) == kp, "apex4: x has K = ",
                    x.size(-1), ", which does not pad to the weight's K = ", kp);
  return group_size;
}

at::Tensor gemm_like_x(const at::Tensor& x, const at::Tensor& a_q, const at::Tensor& a_s,
                       const at::Tensor& w_q, const at::Tensor& w_s,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& prefetch) {
  static auto gemm =
      c10::Dispatcher::singleton().findSchemaOrThrow("apex4::w4a4_gemm", "").typed<GemmFn>();
  return gemm.call(a_q, a_s, w_q, w_s, bias, x.scalar_type(), prefetch);
}

// Quantize the activations at the weight's granularity, then multiply.
at::Tensor w4a4_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_s,
                       const std::optional<at::Tensor>& bias, double act_clip,
                       const std::optional<at::Tensor>& prefetch) {
  const auto group_size = weight_group_size(x, w_q, w_s);
  static auto quantize = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("apex4::quantize_act", "")
                             .typed<QuantizeFn>();
  auto [a_q, a_s] = quantize.call(x, group_size, act_clip);
  return gemm_like_x(x, a_q, a_s, w_q, w_s, bias, prefetch);
}

// The same with an online rotation of the activations, fused into their
// quantization (the weight was rotated offline to match).
at::Tensor w4a4_rotated_linear(const at::Tensor& x, const at::Tensor& rotation,
                               const at::Tensor& w_q, const at::Tensor& w_s,
                               const std::optional<at::Tensor>& bias, double act_clip) {
  const auto group_size = weight_group_size(x, w_q, w_s);
  static auto quantize = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("apex4::hadamard_quantize_act", "")
                             .typed<RotatedQuantizeFn>();
  auto [a_q, a_s] = quantize.call(x, rotation, group_size, act_clip);
  return gemm_like_x(x, a_q, a_s, w_q, w_s, bias, std::nullopt);
}

TORCH_LIBRARY(apex4, m) {
  m.def("quantize_act(Tensor x, int? group_size=None, float clip_ratio=1.0) -> (Tensor, Tensor)");
  m.def("quantize_weight(Tensor w, int? group_size=None, float clip_ratio=1.0) -> (Tensor, Tensor)");
  m.def("pack_int4(Tensor values) -> Tensor");
  m.def("unpack_int4(Tensor packed) -> Tensor");
  m.def(
      "w4a4_gemm(Tensor a_q, Tensor a_s, Tensor w_q, Tensor w_s, Tensor? bias=None, "
      "ScalarType? out_dtype=None, Tensor? prefetch=None) -> Tensor");
  m.def(
      "w4a4_linear(Tensor x, Tensor w_q, Tensor w_s, Tensor? bias=None, float act_clip=1.0, "
      "Tensor? prefetch=None) -> Tensor");
  m.def("hadamard(Tensor x, Tensor factor) -> Tensor");
  m.def(
      "hadamard_quantize_act(Tensor x, Tensor factor, int? group_size=None, "
      "float clip_ratio=1.0) -> (Tensor, Tensor)");
  m.def(
      "w4a4_rotated_linear(Tensor x, Tensor rotation, Tensor w_q, Tensor w_s, Tensor? bias=None, "
      "float act_clip=1.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(apex4, CompositeExplicitAutograd, m) {
  m.impl("w4a4_linear", &w4a4_linear);
  m.impl("w4a4_rotated_linear", &w4a4_rotated_linear);
}

}  // namespace apex4

// An importable module, so `import torch_apex4._C` loads the library and runs
// the registrations above (the extension-cpp pattern). It also exposes the
// layout's size rules, so Python (fake impls, quantize_) never restates them.
namespace {

PyObject* py_layout_call(PyObject* args, int64_t (*fn)(int64_t, int64_t)) {
  long long k = 0;
  PyObject* group = Py_None;
  if (!PyArg_ParseTuple(args, "L|O", &k, &group)) return nullptr;
  long long g = 0;
  if (group != Py_None) {
    g = PyLong_AsLongLong(group);
    if (g == -1 && PyErr_Occurred()) return nullptr;
  }
  if (k <= 0 || g < 0 || (g > 0 && g % apex4::kKAlign != 0)) {
    PyErr_Format(PyExc_ValueError,
                 "apex4: need K > 0 and group_size None or a positive multiple of %lld, got K=%lld, "
                 "group_size=%lld",
                 static_cast<long long>(apex4::kKAlign), k, g);
    return nullptr;
  }
  return PyLong_FromLongLong(fn(k, g));
}

PyObject* py_padded_k(PyObject*, PyObject* args) { return py_layout_call(args, apex4::padded_k); }
PyObject* py_num_groups(PyObject*, PyObject* args) {
  return py_layout_call(args, apex4::num_groups);
}

PyMethodDef methods[] = {
    {"padded_k", py_padded_k, METH_VARARGS, "padded_k(k, group_size=None): K after zero padding"},
    {"num_groups", py_num_groups, METH_VARARGS, "num_groups(k, group_size=None): scale groups"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
