// The ext-only ops of lenet_fast._C and the Python module entry point.  The ops of the
// table in lenet_fast/ops.py are not here: their schemas are defined from Python
// (lenet_fast/ext_backend.py calls ops.register_kernel_ops("ext")), and each op's file
// (csrc/<name>.cpp) registers its CPU/CUDA kernels and its C++ autograd.  The ops below
// exist only in this backend, so their schemas are defined here; the fake of
// ext_count_correct is registered in Python (lenet_fast/ext_backend.py), which
// impl_abstract_pystub tells torch to import when it needs it.
#include <Python.h>

#include <torch/csrc/autograd/autograd.h>
#include <torch/library.h>

#include "ops.h"

namespace lenet_fast {
namespace {

// loss.backward() without the Python around it.  torch.autograd.backward runs Python per
// call (argument normalisation, the implicit ones_like gradient, a context stashed for
// compiled autograd) before the C++ engine starts, a few percent of a LeNet training step
// on a CPU (docs/measurements-behind-the-code.md).  The engine run is the same one.  torch.ops
// calls release the GIL, which the engine requires.
void run_backward(const at::Tensor& loss) { torch::autograd::backward({loss}); }

}  // namespace

TORCH_LIBRARY(lenet_fast, m) {
  m.impl_abstract_pystub("lenet_fast.ext_backend");
  m.def("run_backward(Tensor loss) -> ()", &run_backward);
  m.def("ext_count_correct(Tensor logits, Tensor target) -> Tensor");
  // Mutates the parameters and buffers in place and sets each parameter's .grad (a side
  // effect a schema cannot state): for eager training only, CPU only.
  m.def(
      "ext_lenet_sgd_step(Tensor x, Tensor target, Tensor(a!)[] params, Tensor(b!)[] momentum_buffers, float lr, "
      "float momentum, float weight_decay, float dampening, bool nesterov, bool maximize) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lenet_fast, CPU, m) {
  m.impl("ext_count_correct", &count_correct);
  m.impl("ext_lenet_sgd_step", &lenet_sgd_step);
}

#ifdef LENET_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(lenet_fast, CUDA, m) { m.impl("ext_count_correct", &count_correct); }
#endif

TORCH_LIBRARY_IMPL(lenet_fast, Autograd, m) {
  // An integer count has no gradient: the dispatcher goes straight to the kernel (without
  // this, logits that require grad send every call through torch's boxed fallback).
  m.impl("ext_count_correct", torch::CppFunction::makeFallthrough());
  // Records no graph by design (it runs the backward itself, below autograd).
  m.impl("ext_lenet_sgd_step", torch::CppFunction::makeFallthrough());
}

}  // namespace lenet_fast

// `import lenet_fast._C` loads this library (running the registrations of every
// csrc/*.cpp) and gives a tiny module: HAS_CUDA says whether CUDA kernels were compiled in.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "lenet_fast C++/CUDA kernels; the ops are torch.ops.lenet_fast.ext_*",
      -1,
      nullptr,
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef LENET_FAST_WITH_CUDA
  const long has_cuda = 1;
#else
  const long has_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "HAS_CUDA", has_cuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
