"""Build of the C++ extension ``fusedlars._C``.

* The CPU kernels (csrc/ops.cpp, csrc/host.cpp, csrc/cpu/*.cpp) are always built.
* The CUDA kernels (csrc/cuda/*.cu) are added when the installed torch has CUDA and
  nvcc is found, unless FUSEDLARS_NO_CUDA=1. The reason is printed either way (pip shows it
  only with -v), and recorded next to the extension in ``fusedlars/_build_info.py`` (written by
  build_ext, so it is in the wheel and in an in-place / editable build, and only when the
  extension was really built), which ``fusedlars info`` prints.

Build with the torch you run: ``pip install --no-build-isolation .``
"""

import glob
import os
import platform
import subprocess
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


cpu_sources = _rel(
    [os.path.join(ROOT, "csrc", "ops.cpp"), os.path.join(ROOT, "csrc", "host.cpp")]
    + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
)
cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
# torch glue of the CUDA kernels (host C++; csrc/cuda/*.cu are torch-free, see csrc/cuda/launch.h)
cuda_host_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))

cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
             "-Wno-psabi"]  # fmt: skip
# -Wno-psabi: GCC notes that passing the 64-byte vector type of csrc/cpu/isa_impl.h (fl_vf) by value
# has another ABI with and without AVX-512. Every such function is static or in an anonymous namespace
# and always_inline in one ISA's translation unit, so no call crosses an ABI boundary.
# NOTE: no -march=native: SIMD levels are selected at run time inside the kernels.
# -std=c++20: templated lambdas in csrc/cpu. -ffp-contract=off: no FMA contraction, so the AVX-512,
# AVX2 and generic kernel builds round identically (bitwise equal results, see csrc/cpu/isa_impl.h).
# NOTE: [No FMA contraction in the CUDA kernels] --fmad=false: nvcc otherwise emits every float
# multiply and add as contractible PTX (mul.f32, add.f32) and ptxas fuses a*b + c into one FMA. The
# low-bit state kernels promise the specified fp32 operations one by one (csrc/lars_math.h NOTE
# [Low-bit element math in fp32]), and a fused product-sum differs in the last bit, so the stored
# state would differ from the other backends' now and then (the CPU emulation, compiled by g++ with
# -ffp-contract=off, cannot see it). scripts/cuda_compile_check.py fails on any contractible op in
# the PTX. The cost is one more instruction per fused pair in memory-bound kernels.
nvcc_flags = ["-O3", "-std=c++17", "--fmad=false"]
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
    decision = f"CPU + CUDA kernels (TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
    print(f"fusedlars: building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    ext = CUDAExtension(
        "fusedlars._C",
        cpu_sources + cuda_host_sources + cuda_sources,
        define_macros=define_macros + [("FUSEDLARS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    decision = f"CPU kernels only (CUDA kernels not built: {why_not_cuda})"
    print(f"fusedlars: {decision}", file=sys.stderr)
    ext = CppExtension(
        "fusedlars._C",
        cpu_sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0].strip() if out else cxx
    except Exception:  # the build itself reports a missing compiler
        return cxx


def build_record() -> dict:
    """What this build decided and what it built against (written to fusedlars/_build_info.py)."""
    return {
        "kernels": "cpu+cuda" if why_not_cuda is None else "cpu",
        "decision": decision,
        "why_not_cuda": why_not_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if why_not_cuda is None else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "compiler": _compiler(),
        "cxx_flags": " ".join(cxx_flags),
    }


def write_option_fields_header() -> None:
    """Regenerate csrc/option_fields.h from the table of fusedlars/backends/option_fields.py (it is rewritten
    only when its text changes). The table module imports only its sibling codes.py, so it is loaded from
    its folder as a package of its own, without importing fusedlars (whose extension is being built)."""
    import importlib
    import types

    pkg = types.ModuleType("_fusedlars_option_tables")
    pkg.__path__ = [os.path.join(ROOT, "fusedlars", "backends")]
    sys.modules[pkg.__name__] = pkg
    try:
        importlib.import_module(f"{pkg.__name__}.option_fields").write_header(
            os.path.join(ROOT, "csrc", "option_fields.h")
        )
    finally:
        for name in [n for n in sys.modules if n == pkg.__name__ or n.startswith(pkg.__name__ + ".")]:
            del sys.modules[name]


class build_ext(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, after regenerating csrc/option_fields.h, plus the build record next to the
    built extension."""

    def run(self):
        write_option_fields_header()
        super().run()
        text = (
            '"""Written by setup.py when fusedlars._C was built (do not edit; not in git)."""\n\n'
            f"BUILD = {build_record()!r}\n"
        )
        # setuptools builds into build_lib (what a wheel packs) and, for in-place / editable
        # builds, copies the extension into the source package: write the record in both.
        dirs = {os.path.join(self.build_lib, "fusedlars")}
        if self.inplace or getattr(self, "editable_mode", False):
            dirs.add(os.path.dirname(os.path.abspath(self.get_ext_fullpath("fusedlars._C"))))
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "_build_info.py"), "w") as f:
                f.write(text)


setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
