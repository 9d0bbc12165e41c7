"""The CUDA-on-CPU emulation itself (csrc/emu/simt.h): what it must catch and what it must get right,
on the small kernels of csrc/emu/selftest_kernels.cu. The emulation is only worth its green runs of
csrc/cuda's kernels (tests/test_cuda_emulated.py, tests/test_cuda_backend.py) if these hold."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest
import torch

import cuda_emu

SCHEDULES = range(4)


@pytest.fixture(scope="module")
def st():
    lib = cuda_emu.Lib(cuda_emu.build(kind="selftest"))
    yield lib
    lib.configure()


def _p(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _run(lib, name, *args):
    lib.reset()
    rc = getattr(lib.L, name)(*args)
    return rc, lib.error_text()


@pytest.mark.parametrize("seed", SCHEDULES)
def test_divergent_barrier_is_an_error(st, seed):
    st.configure(seed=seed)
    rc, err = _run(st, "st_divergent_barrier", _p(torch.zeros(32, dtype=torch.int32)))
    assert rc != 0 and "divergent __syncthreads()" in err and "selftest_kernels.cu:" in err, err


@pytest.mark.parametrize("seed", SCHEDULES)
def test_shuffle_with_an_exited_lane_is_an_error(st, seed):
    st.configure(seed=seed)
    rc, err = _run(st, "st_shuffle_after_exit", _p(torch.zeros(32, dtype=torch.float64)))
    assert rc != 0 and ("exited" in err or "deadlock" in err), err


@pytest.mark.parametrize("seed", SCHEDULES)
def test_barrier_after_a_thread_exited_is_an_error(st, seed):
    st.configure(seed=seed)
    rc, err = _run(st, "st_barrier_after_exit", _p(torch.zeros(64, dtype=torch.int32)))
    assert rc != 0 and "exited" in err, err


@pytest.mark.parametrize("seed", SCHEDULES)
def test_grid_sync_needs_a_cooperative_launch(st, seed):
    st.configure(seed=seed, sms=2, blocks_per_sm=2)
    out = torch.zeros(8, dtype=torch.int32)
    rc, err = _run(st, "st_grid_sync", _p(out), 4, 0)
    assert rc != 0 and "not launched cooperatively" in err, err
    out.zero_()
    rc, err = _run(st, "st_grid_sync", _p(out), 4, 1)
    assert rc == 0 and err == "" and out.tolist() == [1] * 4 + [2] * 4


def test_cooperative_grid_must_be_resident(st):
    st.configure(sms=2, blocks_per_sm=2)
    rc, _ = _run(st, "st_grid_sync", _p(torch.zeros(10, dtype=torch.int32)), 5, 1)
    assert rc == 720  # cudaErrorCooperativeLaunchTooLarge, as on a GPU
    st.configure(coop=False)
    rc, _ = _run(st, "st_grid_sync", _p(torch.zeros(4, dtype=torch.int32)), 2, 1)
    assert rc == 801  # cudaErrorNotSupported


def test_missing_syncthreads_shows_under_some_schedule(st):
    """A block sum that reads shared memory without the barrier after the writes: right under some
    schedules, wrong under others; with the barrier right under all."""
    x = torch.arange(1, 257, dtype=torch.float32)
    want = float(x.sum())
    results = {}
    for sync in (1, 0):
        for seed in SCHEDULES:
            st.configure(seed=seed)
            out = torch.zeros(3)
            rc, err = _run(st, "st_block_sum", _p(x), _p(out), 3, sync)
            assert rc == 0, err
            results[sync, seed] = out.tolist()
    assert all(results[1, s] == [want] * 3 for s in SCHEDULES), results
    assert any(results[0, s] != [want] * 3 for s in SCHEDULES), results


def test_missing_grid_barrier_shows(st):
    """Block 0 sums every block's partial: right with grid.sync() under every schedule; without it, wrong
    whenever block 0 runs first (schedule 0, deterministically, not by OS thread timing) and right
    when it runs last (schedule 1)."""
    got = {}
    for sync in (1, 0):
        for seed in SCHEDULES:
            st.configure(seed=seed, sms=4, blocks_per_sm=2)
            part, out = torch.full((8,), float("nan")), torch.zeros(1)
            rc, err = _run(st, "st_two_phase", _p(part), _p(out), 8, sync)
            assert rc == 0, err
            got[sync, seed] = out.item()
    assert all(got[1, s] == 36.0 for s in SCHEDULES), got
    assert got[0, 0] != got[0, 0] and got[0, 1] == 36.0, got  # NaN: block 0 read before anyone wrote


def test_misaligned_128bit_access_is_stopped_by_ubsan(st):
    """The GPU faults on a misaligned 128-bit access; the emulation's uint4 is 16-byte aligned, so UBSan
    stops the process (run in a child process: it aborts)."""
    code = textwrap.dedent(f"""
        import ctypes, torch
        L = ctypes.CDLL({str(st.path)!r})
        x, out = torch.zeros(16), torch.zeros(1)
        L.st_misaligned_load(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()))
        print("no error")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "misaligned address" in r.stderr and "uint4" in r.stderr, r.stderr[-2000:]


def test_launch_rewrite_covers_every_launch():
    """Every <<<...>>> launch of csrc/cuda is rewritten; nothing else of the source changes."""
    src = cuda_emu.KERNELS.read_text()
    text, n = cuda_emu.rewrite(src)
    assert n == src.count("<<<") and n >= 6 and "<<<" not in text
    assert text.count("\n") == src.count("\n")
