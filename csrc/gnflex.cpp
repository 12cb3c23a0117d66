// Operator schemas of the gnflex library: the one place they are defined.
// Back ends register kernels for them in csrc/cpu, csrc/cuda and
// csrc/autograd; the fake (meta) kernels live in gnflex/_meta.py.
#include <torch/library.h>

TORCH_LIBRARY(gnflex, m) {
  // y = act(GroupNorm(input)); mean and rstd are (N, num_groups) in the
  // accumulate dtype (float32, float64 for float64 input). activation is one
  // of "none", "relu", "silu", "gelu".
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

#ifdef GNFLEX_PYTHON_MODULE
// `import gnflex._C` loads this library, which runs the registrations above.
// It exposes no Python functions: everything goes through torch.ops.gnflex.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
