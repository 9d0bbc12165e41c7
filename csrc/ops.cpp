// Operator schema and registration of fusedlars._C (one place).
//
// The module is importable as a Python extension (so `import fusedlars._C` loads the
// registrations); the ops live in the `fusedlars` torch.library namespace.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A minimal module object: importing it runs the static TORCH_LIBRARY registrations.
static struct PyModuleDef fusedlars_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fusedlars_c_module); }
}

static std::string build_info() {
  std::string s = "cpu";
#ifdef FUSEDLARS_WITH_CUDA
  s += "+cuda";
#endif
  return s;
}

TORCH_LIBRARY_FRAGMENT(fusedlars, m) {
  // Build identification, so `fusedlars info` can tell which kernels this binary holds.
  m.def("build_info() -> str", &build_info);
}
