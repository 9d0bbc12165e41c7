"""Compiled and captured steps (NOTE [Compiled steps] in fusedlars/optim/base.py).

* ``torch.compile(opt.step, fullgraph=True)`` on the ``torch``, ``cpu`` and ``triton`` (interpreter)
  backends matches the eager trajectory, with an LR scheduler changing the lr every step and no
  recompilation after the first call;
* grads that are replaced between steps (``model.zero_grad()`` sets them to None) and views that
  break are still stepped exactly;
* ``capturable=True`` keeps every per-step value on the device; CUDA graph capture and replay
  match eager (GPU only).
"""

from __future__ import annotations

import copy
import functools
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fusedlars
from fusedlars import backends

STEPS = 5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # every optimizer's step shares one code object (torch.optim's profiling wrapper): without a
    # reset, earlier tests' cache entries count against dynamo's recompile limit
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _backends():
    out = []
    for name in ("torch", "cpu", "triton"):
        ok, why = backends.status(name)
        out.append(pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name}: {why}")))
    return out


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.ReLU(), torch.nn.Linear(33, 4), torch.nn.LayerNorm(4))
    return m.to(dtype)


def _optimizer(kind, params, backend, **kw):
    if kind == "LAMB":
        return fusedlars.LAMB(params, lr=1e-2, weight_decay=1e-2, max_grad_norm=1.0, backend=backend, **kw)
    cls = getattr(fusedlars, kind)
    return cls(params, lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend, **kw)


def _data(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 9, generator=g).to(dtype), torch.randn(16, 4, generator=g).to(dtype)


def _train(kind, backend, compiler=None, zero="optimizer", steps=STEPS, counter=None, mutate=None):
    """Train ``steps`` steps with a LambdaLR scheduler (a new lr every step); returns the params.
    ``compiler``: None (eager) or a torch.compile backend for ``opt.step``. With a ``counter``
    (CompileCounterWithBackend), ``counter.counts[t]`` is its count after step ``t``."""
    m = _model()
    opt = _optimizer(kind, m.parameters(), backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
    step = opt.step
    if compiler is not None:
        step = torch.compile(opt.step, fullgraph=True, backend=counter or compiler)
    for t in range(steps):
        x, y = _data(t)
        torch.nn.functional.mse_loss(m(x), y).backward()
        if mutate is not None:
            mutate(t, m)
        step()
        if counter is not None:
            counter.counts = getattr(counter, "counts", []) + [counter.frame_count]
        if zero == "optimizer":
            opt.zero_grad()
        else:
            m.zero_grad()  # set_to_none=True: a new grad tensor every step
        sched.step()
    return [p.detach().clone() for p in m.parameters()], opt


def _compare(backend, eager, compiled):
    for a, b in zip(eager, compiled):
        if backend == "torch":
            # inductor fuses the torch backend's ops its own way: fp32 rounding differs
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        else:
            # opaque kernels: the compiled graph runs the very same kernels
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_compiled_step_matches_eager_without_recompiling(kind, backend):
    eager, _ = _train(kind, backend)
    counter = CompileCounterWithBackend("inductor")
    compiled, opt = _train(kind, backend, compiler="inductor", counter=counter)
    _compare(backend, eager, compiled)
    # compiled at the first step only, although the scheduler set a new lr before every one
    assert counter.counts[-1] == counter.counts[0] >= 1, f"compilations per step: {counter.counts}"
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)
    assert opt.backends_in_use() == [backend]


@pytest.mark.slow  # ~1 min of Triton's interpreter
@pytest.mark.parametrize(
    "kind, state_dtype", [("LARS", torch.bfloat16), ("LAMB", "int8")], ids=["LARS-bf16", "LAMB-int8"]
)
def test_compiled_low_bit_triton_step_matches_eager_without_recompiling(kind, state_dtype, monkeypatch):
    """Low-bit state on the Triton backend (its float64 scratch, option rows and int8 maps built by prepare() in
    the eager prelude, not in the first trace, whose cache writes recompiled the second step): bitwise eager's,
    compiled once. (The cpu backend refuses low-bit state in a compiled step, with the reason.)"""
    ok, why = backends.status("triton")
    if not ok:
        pytest.skip(f"triton: {why}")
    monkeypatch.setattr(sys.modules[__name__], "_optimizer", functools.partial(_optimizer, state_dtype=state_dtype))
    eager, _ = _train(kind, "triton")
    counter = CompileCounterWithBackend("inductor")
    compiled, opt = _train(kind, "triton", compiler="inductor", counter=counter)
    _compare("triton", eager, compiled)
    assert counter.counts[-1] == counter.counts[0] >= 1, f"compilations per step: {counter.counts}"
    assert opt.backends_in_use() == ["triton"]


@pytest.mark.parametrize("backend", _backends())
def test_compiled_tvlars_matches_eager(backend):
    eager, _ = _train("TVLARS", backend)
    counter = CompileCounterWithBackend("aot_eager")
    compiled, _ = _train("TVLARS", backend, compiler="aot_eager", counter=counter)
    _compare(backend, eager, compiled)
    assert counter.counts[-1] == counter.counts[0] >= 1, counter.counts


@pytest.mark.parametrize("backend", _backends())
def test_compiled_step_with_set_to_none_grads(backend):
    # model.zero_grad() leaves None, backward makes a fresh grad tensor every step: the graph reads
    # p.grad like torch.optim's compiled steps, so nothing recompiles after the first step
    eager, _ = _train("LARS", backend, zero="none")
    counter = CompileCounterWithBackend("aot_eager")
    compiled, _ = _train("LARS", backend, compiler="aot_eager", zero="none", counter=counter)
    _compare(backend, eager, compiled)
    assert counter.counts[-1] == counter.counts[0], f"compilations per step: {counter.counts}"


def test_replaced_grad_is_read_without_recompiling_and_stays_exact():
    # a grad replaced by another tensor after compilation is read from p.grad at the next call
    def replace(t, m):
        if t == 3:
            w = m[0].weight
            w.grad = w.grad.clone() * 2.0

    backend = "cpu" if backends.status("cpu")[0] else "torch"
    eager, _ = _train("LARS", backend, mutate=replace)
    counter = CompileCounterWithBackend("aot_eager")
    compiled, _ = _train("LARS", backend, compiler="aot_eager", mutate=replace, counter=counter)
    _compare(backend, eager, compiled)
    assert counter.counts[-1] == counter.counts[0], counter.counts


@pytest.mark.parametrize("backend", [b for b in _backends() if b.values[0] != "triton"])
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_state_dict_and_load_state_dict_never_recompile(kind, backend):
    """The README's loop: a compiled step, and opt.state_dict() (a checkpoint) or load_state_dict
    (a resume) every step. 20 of each, no recompilation, and the trajectory equals an eager run
    that never checkpointed."""
    eager, _ = _train(kind, backend, steps=22)
    m = _model()
    opt = _optimizer(kind, m.parameters(), backend)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, fullgraph=True, backend=counter)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
    counts = []
    for t in range(22):
        x, y = _data(t)
        torch.nn.functional.mse_loss(m(x), y).backward()
        step()
        counts.append(counter.frame_count)
        opt.zero_grad()
        sched.step()
        sd = opt.state_dict()
        if t % 2:
            opt.load_state_dict(copy.deepcopy(sd))
    assert counts[-1] == counts[0], f"compilations per step: {counts}"
    _compare(backend, eager, [p.detach() for p in m.parameters()])


def test_compiled_model_and_step_train_together():
    # the usual split: the model compiled, backward eager, the optimizer step compiled on its own
    backend = "cpu" if backends.status("cpu")[0] else "torch"
    results = []
    for compiled in (False, True):
        m = _model()
        opt = fusedlars.LARS(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
        fwd = torch.compile(m, backend="aot_eager") if compiled else m
        step = torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step
        losses = []
        x, y = _data(0)
        for _t in range(STEPS):
            loss = torch.nn.functional.mse_loss(fwd(x), y)
            loss.backward()
            step()
            opt.zero_grad()
            losses.append(loss.detach())
        results.append((torch.stack(losses), [p.detach().clone() for p in m.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[1][0][-1] < results[1][0][0]
    _compare(backend, results[0][1], results[1][1])


def test_lr_scheduler_does_not_wrap_the_step():
    # torch's schedulers would wrap opt.step in a function dynamo refuses to trace
    m = _model()
    opt = fusedlars.LARS(m.parameters(), lr=0.1)
    step_before = opt.step
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert opt.step == step_before
    torch.nn.functional.mse_loss(m(_data(0)[0]), _data(0)[1]).backward()
    opt.step()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        sched.step()


# ---------------------------------------------------------------------------------------------
# capturable


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_capturable_keeps_per_step_values_on_device_and_matches(kind):
    backend = "cpu" if backends.status("cpu")[0] else "torch"
    plain, _ = _train(kind, backend)
    m = _model()
    opt = _optimizer(kind, m.parameters(), backend, capturable=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
    lr_tensors = None
    for t in range(STEPS):
        x, y = _data(t)
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        if lr_tensors is None:
            lr_tensors = [g["lr"] for g in opt.param_groups]
            assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in lr_tensors)
        opt.zero_grad()
        sched.step()
    # the scheduler updated the same tensors in place (what a captured graph reads)
    assert all(g["lr"] is v for g, v in zip(opt.param_groups, lr_tensors))
    assert float(lr_tensors[0]) == pytest.approx(
        0.1 / (1.0 + 0.5 * STEPS) if kind != "LAMB" else 1e-2 / (1 + 0.5 * STEPS)
    )
    for a, b in zip(plain, [p.detach() for p in m.parameters()]):
        assert torch.equal(a, b)


def test_capturable_must_be_bool():
    with pytest.raises(ValueError, match="capturable must be a bool"):
        fusedlars.LARS(_model().parameters(), lr=0.1, capturable="yes")


def _gpu_backends():
    out = []
    for name in ("cuda", "triton", "torch"):
        ok, why = backends.status(name)
        gpu = torch.cuda.is_available()
        out.append(
            pytest.param(
                name,
                marks=pytest.mark.skipif(
                    not (gpu and ok), reason=f"needs a CUDA device and the {name} backend" + ("" if ok else f": {why}")
                ),
            )
        )
    return out


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_cuda_graph_capture_and_replay_match_eager(kind, backend):
    dev = torch.device("cuda")
    shapes = [(1,), (3,), (4097,), (65537,), (0,), (64, 33)]

    def params():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s, generator=g).to(dev)) for s in shapes]

    def grads(t):
        g = torch.Generator().manual_seed(100 + t)
        return [torch.randn(s, generator=g).to(dev) for s in shapes]

    lrs = [0.1 / (1 + t) for t in range(STEPS)]
    # eager reference
    ref = params()
    opt = _optimizer(kind, ref, backend, capturable=True)
    for t in range(STEPS):
        for p, g in zip(ref, grads(t)):
            p.grad = g
        opt.param_groups[0]["lr"] = lrs[t]
        opt.step()
    # captured: warm up (builds buckets, converts lr) on a side stream, capture, replay
    ps = params()
    opt = _optimizer(kind, ps, backend, capturable=True)
    for p, g in zip(ps, grads(0)):
        p.grad = g
    opt.param_groups[0]["lr"] = lrs[0]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()  # step 0, eagerly
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.is_cuda
    for t in range(1, STEPS):
        for p, g in zip(ps, grads(t)):
            p.grad.copy_(g)  # the grads are views of the bucket: refill them in place
        lr.fill_(lrs[t])
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(ref, ps):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_docs_compile_example_runs():
    # docs/usage.md's example, executed as written (model, batch, loader and loss_fn supplied here)
    import pathlib
    import re

    usage = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    section = usage.split("\n## Compiled and captured steps\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "torch.compile(opt.step, fullgraph=True)" in code
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data(0)
    env = dict(
        torch=torch,
        fusedlars=fusedlars,
        model=model,
        batch=256,
        loss_fn=torch.nn.functional.mse_loss,
        loader=[(x, y)] * 4,
    )
    exec(compile(code, "docs/usage.md", "exec"), env)
    after = list(env["model"].parameters())
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, after))
    assert isinstance(env["opt"].param_groups[0]["lr"], torch.Tensor)
