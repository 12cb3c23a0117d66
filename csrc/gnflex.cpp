// Operator schemas of the gnflex library: the one place they are defined,
// and the C++ entry points (gnflex_ops.h) that call them. Back ends register
// kernels in csrc/cpu, csrc/cuda, csrc/autograd and csrc/autocast; the fake
// (meta) kernels live in gnflex/_meta.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "group_norm_types.h"
#include "gnflex_ops.h"

TORCH_LIBRARY(GNFLEX_OP_NAMESPACE, m) {
  // y = act(GroupNorm(input)); mean and rstd are (N, num_groups) in the
  // accumulate dtype (float32, float64 for float64 input). activation: a name
  // of the activation table (group_norm_utils.cpp).
  m.def(
      "group_norm(Tensor input, Tensor? weight, Tensor? bias, int num_groups, "
      "float eps=1e-05, str activation=\"none\") -> (Tensor, Tensor, Tensor)");
  // Gradients of group_norm. Recomputes the pre-activation value from input,
  // mean and rstd (nothing else is saved). Outputs left out by output_mask
  // are returned as undefined tensors (None).
  m.def(
      "group_norm_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor? bias, int num_groups, str activation, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace gnflex {

TensorTriple group_norm(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                        c10::string_view activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(GNFLEX_OP_NAME("group_norm"), "")
                       .typed<TensorTriple(const at::Tensor&, const c10::optional<at::Tensor>&,
                                           const c10::optional<at::Tensor>&, int64_t, double, c10::string_view)>();
  return op.call(input, weight, bias, num_groups, eps, activation);
}

TensorTriple group_norm_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                 const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t num_groups, c10::string_view activation,
                                 std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(GNFLEX_OP_NAME("group_norm_backward"), "")
                       .typed<TensorTriple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t,
                                           c10::string_view, std::array<bool, 3>)>();
  return op.call(grad_out, input, mean, rstd, weight, bias, num_groups, activation, output_mask);
}

}  // namespace gnflex

#ifdef GNFLEX_PYTHON_MODULE
// `import gnflex._C` loads this library, which runs the registrations above.
// The ops go through torch.ops.gnflex; the module itself only reports what
// the CPU kernels read from the machine (`gnflex info`).
#include <Python.h>

#include "cpu/cpu_tuning.h"
#ifdef GNFLEX_WITH_CUDA
#include "cuda/group_norm_cuda_plan.h"
#endif
#include "cpu/group_norm_kernels.h"
#include "group_norm_utils.h"

namespace {

// {"l1d": bytes, "l2": ..., "l3": ..., "cache_source": str, "fused_group_bytes": ...,
//  "fused_sample_bytes": ..., "stream_output_bytes": ..., "l3_reread_bytes": ..., "walk_back_bytes": ...,
//  "walk_back_max_bytes": ..., "schedule": str,
//  "kernel_variant": "DEFAULT" | "AVX2" | "AVX512" | "AVX512_BF16"}
PyObject* cpu_tuning_info(PyObject*, PyObject*) {
  using namespace gnflex::cpu;
  const CacheSizes& c = cache_sizes();
  CpuTuning t;
  const char* variant = nullptr;
  try {
    t = cpu_tuning();
    variant = kernel_variant().name;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return Py_BuildValue(
      "{s:L,s:L,s:L,s:s,s:L,s:L,s:L,s:L,s:L,s:L,s:s,s:s}", "l1d", static_cast<long long>(c.l1d), "l2",
      static_cast<long long>(c.l2), "l3", static_cast<long long>(c.l3), "cache_source", c.source.c_str(),
      "fused_group_bytes", static_cast<long long>(t.fused_group_bytes), "fused_sample_bytes",
      static_cast<long long>(t.fused_sample_bytes), "stream_output_bytes",
      static_cast<long long>(t.stream_output_bytes), "l3_reread_bytes", static_cast<long long>(t.l3_reread_bytes),
      "walk_back_bytes", static_cast<long long>(t.walk_back_bytes), "walk_back_max_bytes",
      static_cast<long long>(t.walk_back_max_bytes), "schedule", schedule_name(t.schedule), "kernel_variant", variant);
}

// The activation names the op accepts (aliases included).
PyObject* activation_names_list(PyObject*, PyObject*) {
  const std::vector<std::string> names = gnflex::activation_names();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* item = PyUnicode_FromString(names[i].c_str());
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

// gnflex._C.autocast_half_output([enabled]): reads, or sets and returns the
// previous value of, the CUDA autocast mode (gnflex_ops.h).
PyObject* autocast_half_output_flag(PyObject*, PyObject* args) {
  int enabled = -1;
  if (!PyArg_ParseTuple(args, "|p", &enabled)) return nullptr;
  const bool previous = gnflex::autocast_half_output();
  if (enabled != -1) gnflex::set_autocast_half_output(enabled != 0);
  return PyBool_FromLong(previous);
}

#ifdef GNFLEX_WITH_CUDA
// gnflex._C.cuda_plan(N, C, HxW, G, element_size, channels_last): what the CUDA
// kernels do with that shape (the CUDA bench reports it).
PyObject* cuda_plan(PyObject*, PyObject* args) {
  long long N, C, HxW, G, element_size;
  int channels_last;
  if (!PyArg_ParseTuple(args, "LLLLLp", &N, &C, &HxW, &G, &element_size, &channels_last)) return nullptr;
  try {
    const auto p = gnflex::cuda::plan_info(N, C, HxW, G, element_size, channels_last != 0);
    return Py_BuildValue("{s:s,s:L,s:L,s:L,s:L}", "path", p.path.c_str(), "forward_tickets",
                         static_cast<long long>(p.forward_tickets), "backward_tickets",
                         static_cast<long long>(p.backward_tickets), "rounds", static_cast<long long>(p.rounds),
                         "reuse_bytes", static_cast<long long>(p.reuse_bytes));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}
#endif

PyMethodDef methods[] = {
    {"activation_names", activation_names_list, METH_NOARGS, "The activation names the op accepts, aliases included."},
    {"autocast_half_output", autocast_half_output_flag, METH_VARARGS,
     "The CUDA autocast mode: half output (True) or torch's float32 rule; sets it when given."},
    {"cpu_tuning", cpu_tuning_info, METH_NOARGS,
     "Cache sizes, budgets, schedule and the kernel variant (CPU capability) of the CPU kernels."},
#ifdef GNFLEX_WITH_CUDA
    {"cuda_plan", cuda_plan, METH_VARARGS, "Path, tickets and rounds of the CUDA kernels for a shape."},
#endif
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
#endif
