"""Shared pytest setup.

Triton decides at decoration time whether its kernels are interpreted, so
TRITON_INTERPRET must be in the environment before anything imports fusedlars'
Triton kernels: on machines without CUDA we run them in the interpreter on CPU tensors.
"""

import os

import torch

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
