"""Build of the C++ extension ``fusedlars._C``.

* The CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always built.
* The CUDA kernels (csrc/cuda/*.cu) are added when the installed torch has CUDA and
  nvcc is found, unless FUSEDLARS_NO_CUDA=1. The reason is printed either way.

Build with the torch you run: ``pip install --no-build-isolation .``
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover
    sys.exit(
        "fusedlars: torch must be installed before building (pip install torch), then "
        "`pip install --no-build-isolation .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


cpu_sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
# torch glue of the CUDA kernels (host C++; csrc/cuda/*.cu are torch-free, see csrc/cuda/launch.h)
cuda_host_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))

cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]
# NOTE: no -march=native: SIMD levels are selected at run time inside the kernels.
# -std=c++20: templated lambdas in csrc/cpu. -ffp-contract=off: no FMA contraction, so the AVX-512,
# AVX2 and generic kernel builds round identically (bitwise equal results, see csrc/cpu/isa_impl.h).
link_flags = ["-fopenmp"]
define_macros = [("FUSEDLARS_EXT", "1")]

want_cuda = os.environ.get("FUSEDLARS_NO_CUDA", "0") != "1"
why_not_cuda = None
if not want_cuda:
    why_not_cuda = "FUSEDLARS_NO_CUDA=1"
elif torch.version.cuda is None:
    why_not_cuda = f"the installed torch {torch.__version__} has no CUDA"
elif CUDA_HOME is None:
    why_not_cuda = "nvcc / CUDA_HOME not found"
elif not cuda_sources:
    why_not_cuda = "no CUDA sources in csrc/cuda"

if why_not_cuda is None:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0;10.0+PTX")
    print(f"fusedlars: building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    ext = CUDAExtension(
        "fusedlars._C",
        cpu_sources + cuda_host_sources + cuda_sources,
        define_macros=define_macros + [("FUSEDLARS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=link_flags,
    )
else:
    print(f"fusedlars: CPU kernels only (CUDA kernels not built: {why_not_cuda})", file=sys.stderr)
    ext = CppExtension(
        "fusedlars._C",
        cpu_sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
