"""What only the fused CUDA backend has (fusedlars/backends/cuda.py, csrc/cuda): its two launch paths
(one cooperative launch, or two) bitwise equal, the cooperative path taken where supported, the ops
under torch.library.opcheck, CUDA graph capture, tensors above 2^31 elements, autocast with a real
GradScaler. The reference-agreement matrix (presets on both paths, options, dtypes, masters,
non-finite grads, skips, grad-less layers, views, state_dict round trips) is
tests/test_fused_backends.py, which every fused backend passes.

Where a GPU is visible the kernels run on it. Without one, the same tests run csrc/cuda's kernels and
host launchers under the CUDA-on-CPU emulation (tests/cuda_emu.py, csrc/emu/simt.h) on CPU tensors,
each test under one of the four emulated schedules (chosen from the test's name). The few tests
that need the real device (CUDA graphs, torch.library.opcheck of the CUDA ops, > 2^31 elements) are
marked ``gpu`` and skipped without one.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import fusedlars
from fusedlars import backends

from helpers import make_named_grads, make_named_params, run_named

OK, WHY = backends.status("cuda")
HAVE_GPU = torch.cuda.is_available()
EMULATED = not HAVE_GPU
pytestmark = [
    pytest.mark.skipif(HAVE_GPU and not OK, reason=f"a CUDA device is visible but the cuda backend is not: {WHY}")
]

SHAPES = [
    ("a", (1,)),
    ("b", (3,)),
    ("c", (4097,)),
    ("d", (65537,)),  # 5 tiles of 16384, last one of 1 element
    ("e", (0,)),
    ("fc.weight", (33, 72)),
    ("conv.weight", (8, 3, 3, 5)),
    ("zero_w", (40, 17)),
    ("zero_g", (19, 7)),
    ("bias", (64,)),
]
DEV = "cpu" if EMULATED else "cuda"


@pytest.fixture(autouse=True)
def _emulation(request, monkeypatch):
    """Without a GPU: the kernels under the CUDA-on-CPU emulation, schedule chosen from the test id."""
    if EMULATED:
        import cuda_emu

        lib = request.getfixturevalue("emu_lib")
        lib.configure(seed=zlib.crc32(request.node.nodeid.encode()) % 4)
        cuda_emu.install(monkeypatch, lib)


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    return make_named_params(shapes, dtype, seed, device=DEV)


def make_grads(params, step, scale=0.01, special=None):
    return make_named_grads(params, step, scale, special)


def run(cls, backend, *, shapes=SHAPES, **kw):
    return run_named(cls, backend, shapes, device=DEV, **kw)


def test_real_grad_scaler_autocast():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(DEV)
    opt = fusedlars.LARS(model.parameters(), lr=0.1, weight_decay=1e-4, backend="cuda")
    scaler = torch.amp.GradScaler(DEV, init_scale=2.0**10)
    x, y = torch.randn(64, 16, device=DEV), torch.randn(64, 4, device=DEV)
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB], ids=lambda c: c.__name__)
def test_bitwise_deterministic_and_same_for_both_paths(cls, monkeypatch):
    kw = dict(weight_decay=1e-3) if cls is fusedlars.LARS else dict(weight_decay=1e-2, lr=1e-2)
    outs = []
    for p in ("auto", "auto", "two_launch"):
        monkeypatch.setenv("FUSEDLARS_CUDA_PATH", p)
        params, opt = run(cls, "cuda", steps=4, **kw)
        outs.append(([x.detach().clone() for _, x in params], [b.trust_ratio.clone() for b in opt.buckets()]))
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0][0], o[0]))
        assert all(torch.equal(a, b) for a, b in zip(outs[0][1], o[1]))


def test_cooperative_path_used_when_supported():
    from fusedlars.backends import cuda as K

    run(fusedlars.LARS, "cuda", steps=1)
    info = K.build_info()
    assert info["last_path"] == ("cooperative" if info["coop"] == "1" else "two_launch"), info


@pytest.mark.parametrize("op", ["lars", "lamb"])
@pytest.mark.gpu
@pytest.mark.skipif(EMULATED, reason="opcheck of the registered CUDA ops needs a CUDA device")
def test_opcheck(op):
    """Schema / fake-kernel consistency of the CUDA ops (torch.library.opcheck)."""
    from fusedlars.backends import cuda as K

    cls = fusedlars.LARS if op == "lars" else fusedlars.LAMB
    _, opt = run(cls, "cuda", steps=1, lr=1e-2)
    b = opt.buckets()[0]
    sc = K._scratch(b, op.upper())
    tt = sc.tiles
    params, grads, state = K._lists(b, sc)
    head = (params, grads, state, K._addresses(b, sc), False)
    seg = (
        b.wd_mask,
        b.adapt_mask,
        b.active,
        b.has_state,
        b.step,
        b.w_norm,
        b.g_norm,
        b.u_norm,
        b.trust_ratio,
        tt.tile_seg,
        tt.tile_start,
        tt.tile_len,
        tt.seg_tile_ptr,
        sc.group_seg,
        sc.part,
        sc.snap,
    )
    tail = (None, 0.01, None, None)
    for path, ssq in ((0, None), (3, sc.ssq), (4, sc.ssq.clone())):
        if op == "lars":
            args = (
                *head,
                *seg,
                ssq,
                *tail,
                [0.9] + [0.0] * 2 + [1e-3, 0.0, 0.0, float("inf"), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                [0] * 11,
                path,
            )
            torch.library.opcheck(
                torch.ops.fusedlars.lars_step_cuda.default, args, test_utils=("test_schema", "test_faketensor")
            )
        else:
            args = (
                *head,
                *seg,
                ssq,
                *tail,
                None,
                [0.9, 0.999, 0.1, 1e-6, 0.0, 0.01, 0.0, float("inf"), 0.0, 0.0, 0.0],
                [0] * 6,
                path,
            )
            torch.library.opcheck(
                torch.ops.fusedlars.lamb_step_cuda.default, args, test_utils=("test_schema", "test_faketensor")
            )


@pytest.mark.parametrize("cls", [fusedlars.LARS, fusedlars.LAMB], ids=lambda c: c.__name__)
@pytest.mark.gpu
@pytest.mark.skipif(EMULATED, reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_capture_replay_equals_eager(cls):
    kw = dict(weight_decay=1e-3) if cls is fusedlars.LARS else dict(weight_decay=1e-2)
    lr_eager = 0.1 if cls is fusedlars.LARS else 1e-2

    def setup():
        params = make_params()
        lr_t = torch.tensor(lr_eager, device=DEV)
        opt = cls(params, lr=lr_t, backend="cuda", **kw)
        return params, opt, lr_t

    grads = [make_grads(make_params(), t) for t in range(4)]
    pe, oe, lre = setup()
    for t in range(4):
        for (_, p), g in zip(pe, grads[t]):
            p.grad = g.clone()
        lre.fill_(lr_eager * (1 + 0.1 * t))
        oe.step()

    pg, og, lrg = setup()
    for (_, p), g in zip(pg, grads[0]):
        p.grad = g.clone()
    lrg.fill_(lr_eager)
    og.step()  # warm-up: buckets, scratch and tile tables exist before capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph, stream=s):
            og.step()
    torch.cuda.current_stream().wait_stream(s)
    # the capture did not run the step: replay steps 1..3
    for t in range(1, 4):
        for (_, p), g in zip(pg, grads[t]):
            p.grad.copy_(g)
        lrg.fill_(lr_eager * (1 + 0.1 * t))
        graph.replay()
    torch.cuda.synchronize()
    for (_, a), (_, b) in zip(pe, pg):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(EMULATED, reason="needs a CUDA device with > 32 GiB free")
def test_tensor_above_2_pow_31_elements():
    n = 2**31 + 4097
    free, _ = torch.cuda.mem_get_info()
    if free < n * 4 * 4 + (2 << 30):
        pytest.skip(f"needs {n * 16 / 2**30:.0f} GiB of GPU memory")
    p = torch.nn.Parameter(torch.full((n,), 1.0, device=DEV))
    opt = fusedlars.LARS([p], lr=0.1, momentum=0.0, weight_decay=0.0, backend="cuda")
    p.grad = torch.full((n,), 2.0, device=DEV)
    opt.step()
    b = opt.buckets()[0]
    # ||w|| = sqrt(n), ||g|| = 2 sqrt(n); no momentum, no decay: w = 1 - lr * r * 2 everywhere
    r = b.trust_ratio[0].item()
    torch.testing.assert_close(
        b.w_norm[0].double(), torch.tensor(float(n) ** 0.5, dtype=torch.float64, device=DEV), rtol=1e-5, atol=0
    )
    expect = 1.0 - 0.1 * r * 2.0
    assert torch.all(p.detach()[-4097:] == p.detach()[0])
    torch.testing.assert_close(
        p.detach()[[0, 2**31 - 1, 2**31, n - 1]].double(),
        torch.full((4,), expect, dtype=torch.float64, device=DEV),
        rtol=1e-6,
        atol=0,
    )
