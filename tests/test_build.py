"""The compiled extension is part of the product: CI sets FUSEDLARS_REQUIRE_EXT=1 and fails without it.

setup.py records its build decision (CPU kernels only and why, or the CUDA archs) next to the
extension in ``fusedlars/_build_info.py``; ``fusedlars info`` prints it (pip hides setup.py's own
message unless run with -v). .ci/wheel_check.sh checks the same in an installed wheel.
"""

import importlib
import os
import subprocess
import sys
import types

import pytest
import torch

info_mod = importlib.import_module("fusedlars.info")  # the module (``fusedlars.info`` is also the function)

REQUIRE = os.environ.get("FUSEDLARS_REQUIRE_EXT") == "1"


def _ext() -> bool:
    try:
        import fusedlars._C  # noqa: F401
    except ImportError as e:
        if REQUIRE:
            pytest.fail(f"fusedlars._C was not built or does not import: {e}")
        return False
    return True


def test_extension_loads_when_required():
    if not _ext():
        pytest.skip("extension not built here; CI requires it")
    assert torch.ops.fusedlars.build_info().startswith("cpu")


def test_build_record_matches_the_extension():
    if not _ext():
        pytest.skip("extension not built here; CI requires it")
    rec = info_mod.build_record()
    assert rec is not None and rec["ext"] == torch.ops.fusedlars.build_info()
    if "decision" not in rec:  # an extension built before setup.py wrote the record
        if REQUIRE:
            pytest.fail(f"no fusedlars/_build_info.py next to the extension: {rec}")
        pytest.skip("extension built before the build record existed")
    assert rec["problems"] == [], rec
    assert rec["kernels"] == rec["ext"] and rec["torch"] == torch.__version__
    if rec["kernels"] == "cpu":
        assert (
            rec["why_not_cuda"]
            and rec["decision"] == f"CPU kernels only (CUDA kernels not built: {rec['why_not_cuda']})"
        )
        if torch.version.cuda is None:
            assert rec["why_not_cuda"] == f"the installed torch {torch.__version__} has no CUDA"
    else:
        assert rec["why_not_cuda"] is None and rec["cuda_arch_list"] and rec["cuda_arch_list"] in rec["decision"]


def test_info_cli_prints_the_build_decision():
    out = subprocess.run([sys.executable, "-m", "fusedlars", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    build = [ln for ln in lines if ln.startswith("build: ")]
    assert len(build) == 1, out.stdout
    rec = info_mod.build_record()
    if rec is not None and "decision" in rec:
        assert build[0] == f"build: {rec['decision']}"
        assert f"built with torch {rec['torch']}" in out.stdout
    elif rec is None:
        assert "not built" in build[0]


def _fake_record(monkeypatch, **kw):
    rec = dict(kernels="cpu", decision="CPU kernels only (CUDA kernels not built: FUSEDLARS_NO_CUDA=1)",
               why_not_cuda="FUSEDLARS_NO_CUDA=1", cuda_arch_list=None, torch=torch.__version__, torch_cuda=None,
               python="3.x", platform="Linux x86_64", compiler="c++ (test)", cxx_flags="-O3")  # fmt: skip
    rec.update(kw)
    monkeypatch.setitem(sys.modules, "fusedlars._build_info", types.SimpleNamespace(BUILD=rec))


def test_build_record_problems_are_reported(monkeypatch):
    if not _ext():
        pytest.skip("needs the extension's build_info op")
    ext = torch.ops.fusedlars.build_info()
    _fake_record(monkeypatch, kernels=ext)
    rec = info_mod.build_record()
    assert rec["problems"] == [] and info_mod.format_build(rec)[0] == f"build: {rec['decision']}"
    # a record that does not describe the loaded binary, or another torch than the one running
    _fake_record(monkeypatch, kernels="cpu+cuda" if ext == "cpu" else "cpu", torch="0.0.1")
    rec = info_mod.build_record()
    assert len(rec["problems"]) == 2
    text = "\n".join(info_mod.format_build(rec))
    assert "stale record" in text and "built against torch 0.0.1" in text and text.count("WARNING") == 2


# ---------------------------------------------------------------------------------------------
# setup.py NOTE [No FMA contraction in the CUDA kernels]


def _load_compile_check():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "cuda_compile_check", os.path.join(root, "scripts", "cuda_compile_check.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return root, mod


def test_nvcc_flags_forbid_fma_contraction_in_the_build_and_its_check():
    """setup.py builds the CUDA kernels with --fmad=false, and scripts/cuda_compile_check.py (which CI
    runs for registers, spills and contractible PTX) compiles with every flag setup.py passes nvcc."""
    import ast

    root, check = _load_compile_check()
    tree = ast.parse(open(os.path.join(root, "setup.py")).read())
    flags = next(
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "nvcc_flags" for t in n.targets)
    )
    assert "--fmad=false" in flags
    assert set(flags) <= set(check.FLAGS), sorted(set(flags) - set(check.FLAGS))


def test_contractible_ptx_ops_are_found():
    """The check flags float add / sub / mul without a rounding mode (what ptxas may fuse), predicated
    or not, and passes the same ops with .rn and the integer ones."""
    _, check = _load_compile_check()
    ptx = """
    mul.f64 %fd3, %fd1, %fd2;
    @%p1 add.f32 %f3, %f1, %f2;
    sub.ftz.f32 %f4, %f1, %f2;
    mul.rn.f64 %fd4, %fd1, %fd2;
    add.rn.f32 %f5, %f1, %f2;
    add.s32 %r3, %r1, %r2;
    mul.lo.s64 %rd3, %rd1, %rd2;
    fma.rn.f64 %fd5, %fd1, %fd2, %fd3;
    """
    assert check.contractible_ops(ptx) == {"mul.f64": 1, "add.f32": 1, "sub.ftz.f32": 1}
    assert check.contractible_ops("mul.rn.f32 %f1, %f2, %f3;\n") == {}
