"""Shared pytest setup.

Triton decides at decoration time whether its kernels are interpreted, so
TRITON_INTERPRET must be in the environment before anything imports fusedlars'
Triton kernels: on machines without CUDA we run them in the interpreter on CPU tensors.

NOTE: [OpenMP waiting in the test run]
The suite runs in pytest-xdist workers, each with torch's and our kernels' OpenMP threads, on as
few as 2 cores. libgomp's default is to spin-wait between parallel regions; beside another busy
process that costs milliseconds per region (docs/numbers.md, "Under load"), and the fast lane took
3x as long on 2 cores. Passive waiting is set before torch (and with it libgomp) is loaded, unless
the caller chose a policy. It changes timing only, never a result (the kernels' results do not
depend on the thread count: tests/test_cpu_backend.py).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def emu_lib():
    """csrc/cuda's kernels built under the CUDA-on-CPU emulation (tests/cuda_emu.py), loaded once."""
    import cuda_emu

    return cuda_emu.Lib(cuda_emu.build())


if os.environ.get("FUSEDLARS_TRITON_PROGRAM_ORDER"):

    @pytest.fixture(autouse=True)
    def _triton_program_order(monkeypatch):
        """FUSEDLARS_TRITON_PROGRAM_ORDER=reversed|shuffled: every Triton launch of the run in that program
        order (fusedlars._testing.PROGRAM_ORDER, read from the variable)."""
        from fusedlars import _testing

        _testing.install_program_order(monkeypatch)
