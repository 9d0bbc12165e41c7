"""The CUDA build, checked without a GPU (.ci/cuda_check.sh runs this in a CUDA-torch venv).

* Always: the CUDA op schemas are registered (also in a CPU-only build), and calling them with CPU
  tensors fails with a clear error; ``fusedlars info`` reports the cuda backend with a reason.
* With a CUDA build (FUSEDLARS_EXPECT_CUDA_BUILD=1 makes it required): build_info says ``+cuda``,
  the kernels were compiled for the expected architectures, and without a GPU the cuda backend says
  so instead of failing later.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fusedlars import backends

try:
    import fusedlars._C  # noqa: F401

    EXT = True
except ImportError:
    EXT = False

pytestmark = pytest.mark.skipif(not EXT, reason="fusedlars._C not built")

CUDA_BUILD = EXT and "+cuda" in torch.ops.fusedlars.build_info()
EXPECT = os.environ.get("FUSEDLARS_EXPECT_CUDA_BUILD") == "1"


def _cpu_args(kind: str):
    S, T = 2, 2
    f = lambda n: torch.zeros(n)  # noqa: E731
    params = [torch.zeros(32), torch.zeros(32)]
    common = dict(
        params=params, grads=[torch.zeros(32)], addresses=torch.zeros((5 if kind == "lamb" else 4, S), dtype=torch.int64),
        master=False, wd_mask=f(S), adapt_mask=f(S), active=torch.ones(S), has_state=f(S), step=f(S), w_norm=f(S),
        g_norm=f(S), u_norm=f(S), trust_ratio=f(S), tile_seg=torch.tensor([0, 1], dtype=torch.int32),
        tile_start=torch.tensor([0, 0]), tile_len=torch.tensor([3, 5], dtype=torch.int32),
        seg_tile_ptr=torch.tensor([0, 1, 2]), group_seg=torch.tensor([0, 2]),
        partials=torch.zeros(3 * T, dtype=torch.float64), snap=f(2 * S), ssq=None, lr_tensor=None, lr=0.1,
        inv_scale=None, found_inf=None,
    )  # fmt: skip
    if kind == "lars":
        return torch.ops.fusedlars.lars_step_cuda, dict(
            state=[f(32), f(32)], **common, hyper=[0.9] + [0.0] * 13, modes=[0] * 11
        )
    return torch.ops.fusedlars.lamb_step_cuda, dict(
        state=[f(32)] * 4, **common, clip_coef=None, hyper=[0.0] * 11, modes=[0] * 6
    )


def test_cuda_build_expected():
    if EXPECT:
        assert CUDA_BUILD, f"expected a CUDA build, build_info() = {torch.ops.fusedlars.build_info()!r}"
    assert torch.ops.fusedlars.build_info() in ("cpu", "cpu+cuda")


def test_cuda_ops_registered():
    for op in ("lars_step_cuda", "lamb_step_cuda", "grad_sumsq_cuda", "cuda_info"):
        assert hasattr(torch.ops.fusedlars, op), op
    schema = str(torch.ops.fusedlars.lars_step_cuda.default._schema)
    assert "Tensor(a!)[] params" in schema and "Tensor addresses" in schema and "int path=0" in schema


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_cuda_ops_reject_cpu_tensors_clearly(kind):
    op, kw = _cpu_args(kind)
    with pytest.raises(RuntimeError) as e:
        op(**kw)
    msg = str(e.value)
    if CUDA_BUILD:
        assert f"{kind}_step_cuda runs CUDA tensors only" in msg and "backend='cpu'" in msg, msg
    else:
        assert "has no CUDA kernels" in msg, msg


def test_grad_sumsq_cuda_rejects_cpu_tensors():
    with pytest.raises(RuntimeError, match="CUDA tensors only|has no CUDA kernels"):
        torch.ops.fusedlars.grad_sumsq_cuda(
            [torch.zeros(8)],
            torch.zeros((2, 1), dtype=torch.int64),
            torch.ones(1),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int64),
            torch.ones(1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.float64),
            None,
        )


@pytest.mark.skipif(not CUDA_BUILD, reason="CPU-only build")
def test_cuda_info_reports_architectures():
    from fusedlars.backends import cuda as K

    info = K.build_info()
    assert "archs" in info and "last_path" in info, info
    want = os.environ.get("TORCH_CUDA_ARCH_LIST_EXPECTED", "80,90,100")
    assert K.archs() == [int(a) for a in want.split(",")], info
    if not torch.cuda.is_available():
        assert info["devices"] == "0"


@pytest.mark.skipif(not CUDA_BUILD, reason="CPU-only build")
def test_cuda_backend_status_without_gpu():
    ok, why = backends.status("cuda")
    if torch.cuda.is_available():
        assert ok, why
        assert "cooperative" in why or "2 launches" in why
    else:
        assert not ok
        assert "sm_80" in why and "no CUDA device is visible" in why, why


def test_cuda_backend_status_cpu_only_build():
    if CUDA_BUILD:
        pytest.skip("CUDA build")
    ok, why = backends.status("cuda")
    assert not ok and "without CUDA kernels" in why, why


def test_info_cli_reports_cuda_line():
    out = subprocess.run([sys.executable, "-m", "fusedlars", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("cuda "))
    if CUDA_BUILD and not torch.cuda.is_available():
        assert "sm_80, sm_90, sm_100" in line and "no CUDA device" in line, line
