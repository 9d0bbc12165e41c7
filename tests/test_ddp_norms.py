"""Gradient norms taken where the distributed grads are reduced (#25 item 4): a DDP comm hook
(fusedlars.ddp_comm_hook) and FSDP2's reduce-scattered shards (norms_in_backward=True).

One group of 2 spawned gloo ranks plays every scenario (as tests/test_distributed.py does); the tests
compare what each rank recorded with one process on the global batch (params and every step's
``opt.stats()`` norms to 1e-5), with the same distributed run whose step takes every norm itself
(bitwise on the cpu backend), count the collectives, and count the layers whose step ran from the
recorded norms, so that a test fails both when a result changes and when the norms go unused.
"""

from __future__ import annotations

import functools
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from test_distributed import (
    EXPECTED_ALL_REDUCE,
    STEPS,
    CollectiveCounter,
    _free_port,
    _local_slice,
    batch,
    loss_fn,
    make_model,
)
from torch import nn

import fusedlars
from fusedlars import backends

WORLD = 2
TIMEOUT_S = float(os.environ.get("FUSEDLARS_DIST_TIMEOUT", "150"))
FUSED = backends.status("cpu")[0]
BACKEND = "cpu" if FUSED else "torch"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

OPTIMIZERS = {
    "lars": lambda ps, **kw: fusedlars.LARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-3, **kw),
    # max_grad_norm: the global grad norm is where LAMB uses the recorded sums
    "lamb": lambda ps, **kw: fusedlars.LAMB(ps, lr=0.02, weight_decay=1e-2, max_grad_norm=0.05, **kw),
}


def _stats(opt):
    s = opt.stats()
    return {k: s[k].clone() for k in ("weight_norm", "grad_norm", "trust_ratio")}


def reference(opt_name):
    """One process, the global batch: params and stats after each step."""
    model = make_model()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    stats = []
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        stats.append(_stats(opt))
    return [p.detach().clone() for p in model.parameters()], stats


class UseCounter:
    """Counts, in a worker, the layers whose step ran from recorded gradient norms and the gradient
    reductions the step ran itself, by wrapping the backends' entry points."""

    def __init__(self):
        self.from_records = 0  # layers stepped from recorded norms (LARS)
        self.grad_sumsq = 0  # LAMB's global-norm reductions that read the grads
        for name in ("cpu", "torch"):
            if not backends.status(name)[0]:
                continue
            mod = backends.get(name)
            for attr in ("lars_step_given_grad_sums", "lars_partials_given_grad_sums"):
                orig = getattr(mod, attr, None)
                if orig is None:
                    continue

                def given(b, cfg, g2, _orig=orig):
                    done = _orig(b, cfg, g2)
                    if done is not None and done is not False:
                        self.from_records += len(b.active_idx)
                    return done

                setattr(mod, attr, given)
            orig_sumsq = mod.grad_sumsq

            def sumsq(b, cfg, _orig=orig_sumsq):
                self.grad_sumsq += 1
                return _orig(b, cfg)

            mod.grad_sumsq = sumsq


# ----------------------------------------------------------------------------- scenarios (in workers)


def _scale_first_grad(model, t):
    g = next(iter(model.parameters())).grad
    # in place, between backward and step; a DTensor grad through its local tensor (the tensor FSDP2
    # accumulates into: its wrapper's version counter does not move)
    (g.to_local() if hasattr(g, "to_local") else g).mul_(0.5)


def _train(model, opt, rank, counter, uses, between=None):
    """STEPS steps on this rank's slice of the global batch: params, stats and, per step, the
    collectives of backward and of step, and the layers stepped from recorded norms."""
    out = {"stats": [], "bwd_counts": [], "step_counts": [], "from_records": [], "grad_sumsq": []}
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        out["bwd_counts"].append(
            counter.measure(
                lambda: loss_fn(model, _local_slice(x, rank, WORLD), _local_slice(y, rank, WORLD)).backward()
            )
        )
        if between is not None:
            between(model, t)
        n0, s0 = uses.from_records, uses.grad_sumsq
        out["step_counts"].append(counter.measure(opt.step))
        out["from_records"].append(uses.from_records - n0)
        out["grad_sumsq"].append(uses.grad_sumsq - s0)
        out["stats"].append(_stats(opt))
    return out


def scenario_ddp(opt_name, bucket_view, hook, rank, counter, uses, between=None):
    """hook: "ours" (fusedlars.ddp_comm_hook) or "torch" (torch's default allreduce_hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    model = make_model()
    # a small bucket cap: the three Linear layers land in more than one bucket
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view, bucket_cap_mb=1e-4)
    opt = OPTIMIZERS[opt_name](list(ddp.parameters()))
    ddp.register_comm_hook(None, fusedlars.ddp_comm_hook(opt) if hook == "ours" else allreduce_hook)
    out = _train(ddp, opt, rank, counter, uses, between)
    out["params"] = [p.detach().clone() for p in model.parameters()]
    out["backends"] = opt.backends_in_use()
    return out


class _SkipOnRank1(nn.Module):
    """make_model() whose middle Linear is skipped on rank 1: its grad is None there at hook time and
    DDP creates it after the reduction (find_unused_parameters=True)."""

    def __init__(self, rank):
        super().__init__()
        self.net, self.rank = make_model(), rank

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        h = h[:, :5] if self.rank == 1 else self.net[3](self.net[2](h))
        return self.net[4](h)


def scenario_ddp_edges(bucket_view, hook, rank, counter, uses):
    """Grads DDP creates (a layer unused on one rank) and DDP's Join (rank 1 runs out of inputs: the
    hook then runs outside backward for its shadow all_reduces)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    model = _SkipOnRank1(rank)
    ddp = nn.parallel.DistributedDataParallel(
        model, gradient_as_bucket_view=bucket_view, bucket_cap_mb=1e-4, find_unused_parameters=True
    )
    opt = OPTIMIZERS["lars"](list(ddp.parameters()))
    ddp.register_comm_hook(None, fusedlars.ddp_comm_hook(opt) if hook == "ours" else allreduce_hook)
    with ddp.join():
        for t in range(STEPS - rank):
            x, y = batch(t)
            opt.zero_grad()
            loss_fn(ddp, _local_slice(x, rank, WORLD), _local_slice(y, rank, WORLD)).backward()
            opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "backends": opt.backends_in_use()}


def _fsdp2_model():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def scenario_fsdp2(opt_name, nib, backend, rank, counter, uses, between=None, **kw):
    model = _fsdp2_model()
    opt = OPTIMIZERS[opt_name](list(model.parameters()), norms_in_backward=nib, **kw)
    opt.backend = backend
    out = _train(model, opt, rank, counter, uses, between)
    out["params"] = [p.full_tensor().detach().clone() for p in model.parameters()]  # collective on every rank
    out["backends"] = opt.backends_in_use()
    return out


def _scenarios():
    sc = {}
    for o in OPTIMIZERS:
        for bv in (False, True):
            for hook in ("ours", "torch"):
                sc[f"ddp_{o}_{'view' if bv else 'copy'}_{hook}"] = functools.partial(scenario_ddp, o, bv, hook)
        for nib in (True, False):
            for backend in ("auto", "torch"):
                sc[f"fsdp2_{o}_{backend}_{'nib' if nib else 'two_pass'}"] = functools.partial(
                    scenario_fsdp2, o, nib, backend
                )
    for bv in (False, True):
        for hook in ("ours", "torch"):
            sc[f"ddp_lars_{'view' if bv else 'copy'}_{hook}_edit"] = functools.partial(
                scenario_ddp, "lars", bv, hook, between=_scale_first_grad
            )
    for bv in (False, True):
        for hook in ("ours", "torch"):
            sc[f"ddp_edges_{'view' if bv else 'copy'}_{hook}"] = functools.partial(scenario_ddp_edges, bv, hook)
    for nib in (True, False):
        sc[f"fsdp2_lars_auto_{'nib' if nib else 'two_pass'}_edit"] = functools.partial(
            scenario_fsdp2, "lars", nib, "auto", between=_scale_first_grad
        )
        # with carried weight norms the cpu backend's phase 2 writes each shard's new ||w||^2
        sc[f"fsdp2_lars_auto_{'nib' if nib else 'two_pass'}_carry"] = functools.partial(
            scenario_fsdp2, "lars", nib, "auto", carry_weight_norms=True
        )
    return sc


def _worker(rank, port, outdir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from datetime import timedelta

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    counter, uses = CollectiveCounter(), UseCounter()
    results = {}
    try:
        for name, fn in _scenarios().items():
            t0 = time.perf_counter()
            try:
                results[name] = fn(rank, counter, uses)
            except Exception:  # noqa: BLE001 - recorded, reported by the test that reads it
                results[name] = {"exception": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
            dist.barrier()
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    outdir = tmp_path_factory.mktemp("ddp_norms")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    import torch.distributed.fsdp  # noqa: F401 - imported once here, inherited by forked workers

    ctx = mp.start_processes(_worker, args=(_free_port(), str(outdir)), nprocs=WORLD, join=False, start_method=method)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{WORLD} distributed workers did not finish in {TIMEOUT_S:.0f} s (hang?)")
    finally:
        for p in ctx.processes:  # only the processes this fixture started
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _result(runs, name):
    out = []
    for r, res in enumerate(runs):
        got = res[name]
        assert "exception" not in got, f"rank {r}, scenario {name}:\n{got['exception']}"
        out.append(got)
    return out


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=lambda m: f"{what}: {m}")


def _exact_against_one_process(res, opt_name, what):
    ref_params, ref_stats = reference(opt_name)
    for r, got in enumerate(res):
        for i, (a, b) in enumerate(zip(got["params"], ref_params)):
            _close(a, b, f"{what} rank {r} param {i}")
        for t, (s, rs) in enumerate(zip(got["stats"], ref_stats)):
            for k in rs:
                _close(s[k], rs[k], f"{what} rank {r} step {t} {k}")


def _same_run(got, want, what):
    """The same distributed run with and without the recorded norms: bitwise on the cpu backend."""
    for r, (g, w) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(g["params"], w["params"])):
            if FUSED and g["backends"] == ["cpu"]:
                assert torch.equal(a, b), f"{what} rank {r} param {i}: max diff {(a - b).abs().max()}"
            else:
                _close(a, b, f"{what} rank {r} param {i}")


# ----------------------------------------------------------------------------- tests: DDP


@pytest.mark.parametrize("view", ["copy", "view"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_ddp_hook_is_exact_and_its_norms_are_used(runs, opt_name, view):
    """gradient_as_bucket_view False ("copy": DDP copies the bucket into p.grad after the hook) and
    True ("view": p.grad is the bucket)."""
    ours = _result(runs, f"ddp_{opt_name}_{view}_ours")
    torch_hook = _result(runs, f"ddp_{opt_name}_{view}_torch")
    _exact_against_one_process(ours, opt_name, f"DDP {view} {opt_name}")
    _same_run(ours, torch_hook, f"DDP {view} {opt_name}: fusedlars hook vs torch's allreduce_hook")
    n_layers = len(ours[0]["params"])
    for got, base in zip(ours, torch_hook):
        # the same collectives as torch's default hook: one all_reduce per bucket, none in the step
        assert got["bwd_counts"] == base["bwd_counts"], (got["bwd_counts"], base["bwd_counts"])
        # DDP rebuilds its buckets after the first backward: one bucket, then two here
        assert [c["all_reduce"] for c in got["bwd_counts"]] == [1] + [2] * (STEPS - 1), got["bwd_counts"]
        assert all(set(c) == {"all_reduce"} for c in got["bwd_counts"]), got["bwd_counts"]
        assert all(c == {} for c in got["step_counts"]), got["step_counts"]
        if opt_name == "lars":  # every layer of every step from the hook's norms; none without it
            assert got["from_records"] == [n_layers] * STEPS, got["from_records"]
            assert base["from_records"] == [0] * STEPS, base["from_records"]
        else:  # LAMB's max_grad_norm: no reduction of its own over the grads
            assert got["grad_sumsq"] == [0] * STEPS, got["grad_sumsq"]
            assert base["grad_sumsq"] == [1] * STEPS, base["grad_sumsq"]


@pytest.mark.parametrize("view", ["copy", "view"])
def test_ddp_grad_changed_after_the_hook_is_normed_by_the_step(runs, view):
    """p.grad.mul_ between backward and step: the version moved, the step takes the norms itself
    (the same result as the run without the hook), for its bucket."""
    ours = _result(runs, f"ddp_lars_{view}_ours_edit")
    base = _result(runs, f"ddp_lars_{view}_torch_edit")
    _same_run(ours, base, f"DDP {view}, grad edited after backward")
    for got in ours:
        assert got["from_records"] == [0] * STEPS, got["from_records"]  # one bucket in the optimizer


@pytest.mark.parametrize("view", ["copy", "view"])
def test_ddp_hook_with_grads_ddp_creates_and_join(runs, view):
    """A layer unused on one rank (its grad is created by DDP after the hook: no record, the step takes
    that bucket's norms) and Join's shadow all_reduces outside backward: the torch hook's results."""
    _same_run(_result(runs, f"ddp_edges_{view}_ours"), _result(runs, f"ddp_edges_{view}_torch"), f"DDP {view} edges")


# ----------------------------------------------------------------------------- tests: FSDP2


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_fsdp2_norms_from_reduce_scatter_are_exact_and_used(runs, opt_name, backend):
    """FSDP2 runs the post-accumulate-grad hooks on the sharded param after setting its reduce-scattered
    grad: the step takes each layer's local gradient sum from there and reduces it in the one all_reduce
    of all layers' sums it issues anyway."""
    nib = _result(runs, f"fsdp2_{opt_name}_{backend}_nib")
    two_pass = _result(runs, f"fsdp2_{opt_name}_{backend}_two_pass")
    _exact_against_one_process(nib, opt_name, f"FSDP2 {backend} {opt_name}")
    _same_run(nib, two_pass, f"FSDP2 {backend} {opt_name}: norms from backward vs the two-pass step")
    n_layers = len(nib[0]["params"])
    for got, base in zip(nib, two_pass):
        # the step's collectives are the two-pass step's: a 1-element error flag and the one all_reduce
        # of all layers' sums, and LAMB's global grad norm; the first step exchanges the layout once
        # (tests/test_distributed.py)
        n = EXPECTED_ALL_REDUCE[opt_name]
        want = [{"all_reduce": n, "all_gather_object": 1}] + [{"all_reduce": n}] * (STEPS - 1)
        assert got["step_counts"] == want, got["step_counts"]
        assert got["step_counts"] == base["step_counts"], (got["step_counts"], base["step_counts"])
        assert got["bwd_counts"] == base["bwd_counts"], (got["bwd_counts"], base["bwd_counts"])
        if opt_name == "lars":
            assert got["from_records"] == [n_layers] * STEPS, got["from_records"]
            assert base["from_records"] == [0] * STEPS
        else:
            assert got["grad_sumsq"] == [0] * STEPS, got["grad_sumsq"]
            assert base["grad_sumsq"] == [1] * STEPS


def test_fsdp2_grad_changed_after_backward_is_normed_by_the_step(runs):
    ours = _result(runs, "fsdp2_lars_auto_nib_edit")
    base = _result(runs, "fsdp2_lars_auto_two_pass_edit")
    _same_run(ours, base, "FSDP2, grad edited after backward")
    for got in ours:
        # the edited layer's bucket takes its own norms; FSDP2's layers are in one bucket
        assert got["from_records"] == [0] * STEPS, got["from_records"]


@pytest.mark.parametrize("carry", ["carry"])
def test_fsdp2_norms_from_reduce_scatter_with_carried_weight_norms(runs, carry):
    """carry_weight_norms=True: the sharded step from recorded grad sums reads neither the grads nor,
    after the first step, the weights for its norms; the result is the two-pass step's."""
    nib = _result(runs, f"fsdp2_lars_auto_nib_{carry}")
    _exact_against_one_process(nib, "lars", "FSDP2 carry lars")
    _same_run(nib, _result(runs, f"fsdp2_lars_auto_two_pass_{carry}"), "FSDP2 carry: from backward vs two-pass")
    for got in nib:
        assert got["from_records"] == [len(got["params"])] * STEPS, got["from_records"]
