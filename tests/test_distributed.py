"""Distributed training on CPU with gloo: FSDP2 (DTensor shards), DDP and ZeroRedundancyOptimizer.

Each world size runs ONE group of spawned processes that plays every scenario in turn
(spawning costs seconds on a loaded machine); the tests then check what each rank
recorded against single-process references computed here on the same global batch.
Every collective our ``step()`` issues is counted by wrapping ``torch.distributed``'s
functions in the workers. A hang fails the test after a timeout instead of blocking CI.
"""

from __future__ import annotations

import collections
import functools
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fusedlars

STEPS = 6
BATCH = 6  # divisible by 2 and 3
TIMEOUT_S = float(os.environ.get("FUSEDLARS_DIST_TIMEOUT", "150"))
RTOL = 1e-6

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


# ----------------------------------------------------------------------------- model, data, optimizers


def make_model(seed=0):
    # dim0 of the weights: 8, 5, 2 -> over 3 ranks the shards are (3,3,2), (2,2,1) and (1,1,0)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 2))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 4, generator=g), torch.randn(BATCH, 2, generator=g)


OPTIMIZERS = {
    "lars": lambda ps: fusedlars.LARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-3),
    "tvlars": lambda ps: fusedlars.TVLARS(ps, lr=0.5, momentum=0.9, lmbda=0.05),
    # max_grad_norm: the global clip needs the global grad norm (one more all_reduce per step)
    "lamb": lambda ps: fusedlars.LAMB(ps, lr=0.02, weight_decay=1e-2, max_grad_norm=0.05),
}
# all_reduce calls per step issued by our step() on a sharded model: one 1-element flag that makes a
# rank-local error raise on every rank before anything moves (NOTE [Errors on every rank]), one of all
# layers' sums of squares; LAMB's max_grad_norm adds the global grad norm's
EXPECTED_ALL_REDUCE = {"lars": 2, "tvlars": 2, "lamb": 3, "lamb_noclip": 2}


def loss_fn(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def reference(opt_name):
    """Single-process training on the global batch: the parameters after STEPS steps."""
    model = make_model()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- collective counting

COUNTED = (
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "barrier",
)


class CollectiveCounter:
    """Counts calls of torch.distributed collectives while ``on``."""

    def __init__(self):
        self.on = False
        self.counts = collections.Counter()
        for name in COUNTED:
            orig = getattr(dist, name)

            @functools.wraps(orig)
            def wrapped(*a, _orig=orig, _name=name, **k):
                if self.on:
                    self.counts[_name] += 1
                return _orig(*a, **k)

            setattr(dist, name, wrapped)

    def measure(self, fn):
        self.counts = collections.Counter()
        self.on = True
        try:
            fn()
        finally:
            self.on = False
        return dict(self.counts)


# ----------------------------------------------------------------------------- scenarios (run in workers)


def _local_slice(x, rank, world):
    n = BATCH // world
    return x[rank * n : (rank + 1) * n]


def _fsdp2_model(world, mesh=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = mesh or init_device_mesh("cpu", (world,))
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model, opt, rank, world, counter, step_fn=None):
    counts = []
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        loss_fn(model, _local_slice(x, rank, world), _local_slice(y, rank, world)).backward()
        counts.append(counter.measure(step_fn or opt.step))
    return counts


def scenario_fsdp2(opt_name, rank, world, counter, backend="auto"):
    model = _fsdp2_model(world)
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    opt.backend = backend
    local_ptrs = [p.to_local().data_ptr() for p in model.parameters()]
    counts = _train(model, opt, rank, world, counter)
    full = [p.full_tensor().detach().clone() for p in model.parameters()]  # collective on every rank
    b = opt.buckets()
    info = {
        "local_shapes": [tuple(p.to_local().shape) for p in model.parameters()],
        "backends": opt.backends_in_use(),
        "num_buckets": len(b),
        # FSDP2's storage is intact: the local shards were stepped in place, never re-pointed
        "storage_kept": [p.to_local().data_ptr() for p in model.parameters()] == local_ptrs,
        "state_is_dtensor": all(
            type(v).__name__ == "DTensor" for st in opt.state.values() for k, v in st.items() if k != "step"
        ),
    }
    return {"params": full, "counts": counts, "info": info}


def scenario_ddp(opt_name, rank, world, counter, bucket_view):
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = OPTIMIZERS[opt_name](list(ddp.parameters()))
    grad_ptrs = []
    repointed = []

    def step():
        grads = [(p.grad, p.grad.data_ptr(), p.data_ptr()) for p in ddp.parameters()]
        grad_ptrs.append([gp for _, gp, _ in grads])
        opt.step()
        repointed.append(
            any(
                p.grad is not g or p.grad.data_ptr() != gp or p.data_ptr() != pp
                for p, (g, gp, pp) in zip(ddp.parameters(), grads)
            )
        )

    counts = _train(ddp, opt, rank, world, counter, step)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "counts": counts,
        # with bucket views, p.grad stays a view of DDP's bucket (DDP rebuilds its buckets once after
        # the first iteration); our step never re-points a grad or a param
        "grad_ptrs_stable": all(g == grad_ptrs[1] for g in grad_ptrs[1:]),
        "repointed": any(repointed),
        "grads_in_ddp_bucket": [
            p.grad.untyped_storage().nbytes() > p.grad.numel() * p.grad.element_size() for p in ddp.parameters()
        ],
        "backends": opt.backends_in_use(),
    }


def scenario_zero(opt_name, rank, world, counter, bucket_view):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    zero = ZeroRedundancyOptimizer(
        list(ddp.parameters()),
        optimizer_class=fusedlars.LARS,
        parameters_as_bucket_view=bucket_view,
        lr=0.5,
        momentum=0.9,
        weight_decay=1e-3,
    )
    inner_counts = []
    inner_step = zero.optim.step

    def counted_inner(*a, **k):
        c = counter.counts.copy()
        out = inner_step(*a, **k)
        inner_counts.append(sum((counter.counts - c).values()))
        return out

    zero.optim.step = counted_inner
    data_ptrs = []

    def step():
        zero.step()
        data_ptrs.append([p.data_ptr() for p in model.parameters()])

    _train(ddp, zero, rank, world, counter, step)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "inner_counts": inner_counts,
        "data_ptrs_stable": all(d == data_ptrs[0] for d in data_ptrs),
    }


def _expect_error(fn, *needles):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what we test
        msg = f"{type(e).__name__}: {e}"
        return {"raised": True, "msg": msg, "ok": all(n in msg for n in needles)}
    return {"raised": False, "msg": "", "ok": False}


def _one_backward(model, rank, world):
    x, y = batch(0)
    loss_fn(model, _local_slice(x, rank, world), _local_slice(y, rank, world)).backward()


def scenario_errors(rank, world, counter):
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    # 1. different parameter sets across ranks (rank 1 leaves out the last bias)
    model = _fsdp2_model(world)
    _one_backward(model, rank, world)
    ps = list(model.parameters())
    opt = fusedlars.LARS(ps[:-1] if rank == 1 else ps, lr=0.1)
    out["param_sets"] = _expect_error(opt.step, "differ across ranks", "raised on every rank")
    # 2. DTensor and plain tensors in one group, on rank 0 only: rank 1's layout is valid, it still raises
    extra = [nn.Parameter(torch.randn(3))] if rank == 0 else []
    opt = fusedlars.LARS(ps + extra, lr=0.1)
    out["mixed"] = _expect_error(opt.step, "mixes DTensor", "raised on every rank")
    # 3. two meshes in one optimizer
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    model2 = _fsdp2_model(world, mesh=mesh2)
    _one_backward(model2, rank, world)
    opt = fusedlars.LARS(ps + list(model2.parameters()), lr=0.1)
    out["meshes"] = _expect_error(opt.step, "different device meshes", "raised on every rank")
    # 4. a backend without the partials/apply split refuses sharded buckets, with the reason
    opt = fusedlars.LARS(ps, lr=0.1, backend="reference")
    out["backend"] = _expect_error(opt.step, "cannot step FSDP2/DTensor-sharded", "backend='torch'")
    # 5. a compiled step over sharded params refuses with the reason (the all_reduce sits between kernels)
    opt = fusedlars.LARS(ps, lr=0.1)
    compiled = torch.compile(opt.step, fullgraph=True, backend="eager")
    out["compile"] = _expect_error(compiled, "cannot be compiled", "outside the compiled region")
    return out


# ----------------------------------------------------------------------------- meshes (world 4)
# TP alone, TP + FSDP2 (FSDP2 gives TP-sharded params _StridedShard placements), HSDP and FSDP2 on 4
# ranks, against the same model trained in one process on the global batch: params and every rank's
# per-layer norms and trust ratios (a dim reduced twice scales both norms alike and hides in params).

MESH_BATCH = 12  # divisible by the 2 and 4 data-parallel ranks of the meshes
MESH_OPTIMIZERS = {
    **OPTIMIZERS,
    "lamb_noclip": lambda ps: fusedlars.LAMB(ps, lr=0.02, weight_decay=1e-2),
}


def make_mesh_model(seed=0):
    # TP's activations need even shards (12 over 2 or 4 ranks); the rest is uneven: the row-wise head
    # Linear(6, 1) over 4 TP ranks is (1, 2), (1, 2), (1, 1), (1, 1), each local shard keeping the stride
    # 6 of its size-1 dim (dense: stepped in place), and FSDP2 shards 6 and 1 rows over 2 or 4 ranks
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 1))


def mesh_batch(step):
    g = torch.Generator().manual_seed(300 + step)
    return torch.randn(MESH_BATCH, 4, generator=g), torch.randn(MESH_BATCH, 1, generator=g)


def _stats_by_name(opt):
    s = opt.stats()
    return {k: dict(zip(s["names"], s[k].tolist())) for k in ("weight_norm", "grad_norm", "trust_ratio")}


def mesh_reference(opt_name):
    """One process, the global batch: params and per-layer stats after each step."""
    model = make_mesh_model()
    opt = MESH_OPTIMIZERS[opt_name](list(model.named_parameters()))
    stats = []
    for t in range(STEPS):
        x, y = mesh_batch(t)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        stats.append(_stats_by_name(opt))
    return [p.detach().clone() for p in model.parameters()], stats


def _tp_plan():
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # the head takes the replicated activations and shards them itself
    return {"0": ColwiseParallel(), "2": RowwiseParallel(), "4": RowwiseParallel(input_layouts=Replicate())}


def _mesh_model(layout, world):
    """(model, data-parallel rank, data-parallel size) for a mesh layout over ``world`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    model = make_mesh_model()
    rank = dist.get_rank()
    if layout == "tp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        return parallelize_module(model, mesh, _tp_plan()), 0, 1
    if layout == "tp_fsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], _tp_plan())
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        return model, mesh["dp"].get_local_rank(), 2
    if layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:  # fsdp2
        mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, rank, world


def scenario_mesh(layout, opt_name, rank, world, counter):
    model, dp_rank, dp = _mesh_model(layout, world)
    opt = MESH_OPTIMIZERS[opt_name](list(model.named_parameters()))
    counts, stats = [], []
    n = MESH_BATCH // dp
    for t in range(STEPS):
        x, y = mesh_batch(t)
        opt.zero_grad()
        loss_fn(model, x[dp_rank * n : (dp_rank + 1) * n], y[dp_rank * n : (dp_rank + 1) * n]).backward()
        counts.append(counter.measure(opt.step))
        stats.append(_stats_by_name(opt))
    full = [p.full_tensor().detach().clone() for p in model.parameters()]
    placements = {name: str(p.placements) for name, p in model.named_parameters()}
    return {"params": full, "counts": counts, "stats": stats, "placements": placements,
            "backends": opt.backends_in_use()}  # fmt: skip


def scenario_rank_local_error(rank, world, counter):
    """A bad grad on rank 1 only, at the first step (buckets not built yet) and at a later one: every
    rank raises before any collective of the step's math, nothing moves, no rank hangs."""
    out = {}
    for when in ("first", "later"):
        model, dp_rank, dp = _mesh_model("tp_fsdp", world)
        opt = fusedlars.LAMB(list(model.named_parameters()), lr=0.02, max_grad_norm=1.0)
        if when == "later":
            _one_mesh_backward(model, dp_rank, dp)
            opt.step()
        _one_mesh_backward(model, dp_rank, dp)
        before = [p.to_local().detach().clone() for p in model.parameters()]
        if rank == 1:
            p = next(iter(model.parameters()))
            p.grad_dtype = None  # torch lets a grad's dtype differ from its param's only when told to
            p.grad = p.grad.to(torch.float64)
        # rank 1 raises its own error; the others name it and rank 1
        out[when] = _expect_error(opt.step, *(["does not match the param"] + (["rank 1:"] if rank != 1 else [])))
        out[when]["unchanged"] = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
        out[when]["own_error"] = rank != 1 or "step() failed on another rank" not in out[when]["msg"]
    return out


def _one_mesh_backward(model, dp_rank, dp):
    x, y = mesh_batch(0)
    n = MESH_BATCH // dp
    loss_fn(model, x[dp_rank * n : (dp_rank + 1) * n], y[dp_rank * n : (dp_rank + 1) * n]).backward()


MESH_LAYOUTS = ("tp", "tp_fsdp", "hsdp", "fsdp2")


def _scenarios(world):
    sc = {f"fsdp2_{o}": functools.partial(scenario_fsdp2, o) for o in OPTIMIZERS}
    # the portable path too (the auto choice on CPU is the fused C++ kernels)
    sc.update({f"fsdp2_{o}_torch": functools.partial(scenario_fsdp2, o, backend="torch") for o in ("lars", "lamb")})
    if world == 4:
        sc = {f"{lay}_{o}": functools.partial(scenario_mesh, lay, o) for lay in MESH_LAYOUTS for o in MESH_OPTIMIZERS}
        sc["rank_local_error"] = scenario_rank_local_error
        return sc
    if world == 2:
        sc.update(
            {
                "ddp_lars": functools.partial(scenario_ddp, "lars", bucket_view=False),
                "ddp_bucket_view_lars": functools.partial(scenario_ddp, "lars", bucket_view=True),
                "ddp_bucket_view_lamb": functools.partial(scenario_ddp, "lamb", bucket_view=True),
                "zero_lars": functools.partial(scenario_zero, "lars", bucket_view=False),
                "zero_bucket_view_lars": functools.partial(scenario_zero, "lars", bucket_view=True),
                "errors": scenario_errors,
            }
        )
    return sc


def _worker(rank, world, port, outdir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from datetime import timedelta

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    counter = CollectiveCounter()
    results = {}
    try:
        for name, fn in _scenarios(world).items():
            t0 = time.perf_counter()
            try:
                results[name] = fn(rank, world, counter)
            except Exception:  # noqa: BLE001 - recorded, reported by the test that reads it
                results[name] = {"exception": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
            dist.barrier()
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, outdir):
    import torch.multiprocessing as mp

    # fork (where available) skips re-importing torch and FSDP in every worker: seconds each on a
    # loaded machine. The workers use one thread (no OpenMP state is inherited across the fork).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    import torch.distributed.fsdp  # noqa: F401 - imported once here, inherited by forked workers
    import torch.distributed.optim  # noqa: F401

    ctx = mp.start_processes(
        _worker, args=(world, _free_port(), str(outdir)), nprocs=world, join=False, start_method=method
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} distributed workers did not finish in {TIMEOUT_S:.0f} s (hang?)")
    finally:
        for p in ctx.processes:  # only the processes this test started
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = _launch(world, tmp_path_factory.mktemp(f"world{world}"))
        return cache[world]

    return get


def _result(runs, world, name):
    out = []
    for r, res in enumerate(runs(world)):
        got = res[name]
        assert "exception" not in got, f"rank {r}, scenario {name}:\n{got['exception']}"
        out.append(got)
    return out


def _assert_params(got, ref, what):
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(
            a, b, rtol=RTOL, atol=RTOL * float(b.abs().max()), msg=lambda m: f"{what} param {i}: {m}"
        )


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS) + ["lars_torch", "lamb_torch"])
def test_fsdp2_matches_single_process_with_one_all_reduce_per_step(runs, world, opt_name):
    res = _result(runs, world, f"fsdp2_{opt_name}")
    base, _, backend = opt_name.partition("_")
    ref = reference(base)
    fused = fusedlars.backends.status("cpu")[0]
    for r, got in enumerate(res):
        _assert_params(got["params"], ref, f"FSDP2 {opt_name} world {world} rank {r}")
        info = got["info"]
        # backend='auto' steps the local shards on the fused kernels (the torch backend where asked)
        assert info["backends"] == [backend or ("cpu" if fused else "torch")], info
        assert info["storage_kept"] and info["state_is_dtensor"], info
        for t, c in enumerate(got["counts"]):
            # the first step also exchanges the layout fingerprint (1-D mesh: one all_gather_object)
            expected = {"all_reduce": EXPECTED_ALL_REDUCE[base]}
            if t == 0:
                expected["all_gather_object"] = 1
            assert c == expected, f"rank {r} step {t}: collectives {c}, expected {expected}"
    if world == 3:  # uneven shards, and an empty one: dim0 = 5 -> (2, 2, 1); dim0 = 2 -> (1, 1, 0)
        assert [s[0] for s in res[2]["info"]["local_shapes"]] == [2, 2, 1, 1, 0, 0]
        assert [s[0] for s in res[0]["info"]["local_shapes"]] == [3, 3, 2, 2, 1, 1]


@pytest.mark.parametrize("name", ["ddp_lars", "ddp_bucket_view_lars", "ddp_bucket_view_lamb"])
def test_ddp_matches_single_process_and_keeps_ddp_grad_views(runs, name):
    opt_name = name.rsplit("_", 1)[1]
    ref = reference(opt_name)
    for r, got in enumerate(_result(runs, 2, name)):
        _assert_params(got["params"], ref, f"{name} rank {r}")
        assert all(c == {} for c in got["counts"]), f"our step issued collectives under DDP: {got['counts']}"
        assert not got["repointed"], "the step re-pointed a param or a grad"
        assert got["backends"] == ["cpu" if fusedlars.backends.status("cpu")[0] else "torch"], got["backends"]
        if "bucket_view" in name:  # read in place from DDP's gradient buckets
            assert got["grad_ptrs_stable"], "p.grad left DDP's bucket between steps"
            assert got["grads_in_ddp_bucket"] == [True] * len(ref), got["grads_in_ddp_bucket"]


@pytest.mark.parametrize("name", ["zero_lars", "zero_bucket_view_lars"])
def test_zero_redundancy_optimizer_matches_single_process(runs, name):
    ref = reference("lars")
    for r, got in enumerate(_result(runs, 2, name)):
        _assert_params(got["params"], ref, f"{name} rank {r}")
        assert all(c == 0 for c in got["inner_counts"]), got["inner_counts"]
        if "bucket_view" in name:
            assert got["data_ptrs_stable"], "p.data left ZeRO's bucket"


@pytest.mark.parametrize("case", ["param_sets", "mixed", "meshes", "backend", "compile"])
def test_mismatched_layouts_raise_on_every_rank(runs, case):
    res = _result(runs, 2, "errors")
    for r, got in enumerate(res):
        e = got[case]
        assert e["raised"] and e["ok"], f"rank {r}: {e['msg'] or 'no error'}"


@pytest.mark.parametrize("opt_name", list(MESH_OPTIMIZERS))
@pytest.mark.parametrize("layout", MESH_LAYOUTS)
def test_every_mesh_matches_single_process_params_and_stats(runs, layout, opt_name):
    """TP, TP + FSDP, HSDP, FSDP2 on 4 gloo ranks: params to 1e-5 and every rank's per-layer norms and
    trust ratios to 1e-5 of one process on the global batch; the step's all_reduces are counted."""
    ref_params, ref_stats = mesh_reference(opt_name)
    res = _result(runs, 4, f"{layout}_{opt_name}")
    if layout == "tp_fsdp":  # the placement that hid the dp dim from a Shard-only test
        assert "_StridedShard" in res[0]["placements"]["0.weight"], res[0]["placements"]
    for r, got in enumerate(res):
        for i, (a, b) in enumerate(zip(got["params"], ref_params)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()),
                                       msg=lambda m: f"{layout} {opt_name} rank {r} param {i}: {m}")  # fmt: skip
        for t, (st, ref) in enumerate(zip(got["stats"], ref_stats)):
            for key, per_layer in ref.items():
                for name, want in per_layer.items():
                    have = st[key][name]
                    assert have == pytest.approx(want, rel=1e-5, abs=1e-7), (
                        f"{layout} {opt_name} rank {r} step {t} {key}[{name}]: {have} vs {want}"
                    )
        assert got["backends"] and all(b == ("cpu" if fusedlars.backends.status("cpu")[0] else "torch")
                                       for b in got["backends"]), got["backends"]  # fmt: skip
        for t, c in enumerate(got["counts"][1:], 1):  # after the first step's layout exchange
            assert c == {"all_reduce": EXPECTED_ALL_REDUCE[opt_name]}, f"rank {r} step {t}: {c}"


@pytest.mark.parametrize("when", ["first", "later"])
def test_a_rank_local_error_raises_on_every_rank_and_nothing_moves(runs, when):
    for r, got in enumerate(_result(runs, 4, "rank_local_error")):
        e = got[when]
        assert e["raised"] and e["ok"], f"rank {r}: {e['msg'] or 'no error'}"
        assert e["unchanged"] and e["own_error"], f"rank {r}: {e}"


def test_runtime_budget(runs):
    # the scenarios (not counting process start) stay small on a loaded 2-core machine
    per = {(w, k): round(v["seconds"], 2) for w in (2, 3) for k, v in runs(w)[0].items()}
    print(per)
    total = sum(per.values())
    assert total < 60, total
