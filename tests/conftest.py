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
