"""How many passes over the gradients a step costs: two-pass LARS, norms taken in backward, clipping.

    python -m fusedlars.tools.grad_passes [--rounds 60] [--threads 2] [--shapes resnet50] [--device cuda]

Times, interleaved round-robin (the first variant rotates every round) in one process over the shape
set's tensors (fp32, the grads kept from round to round as after ``zero_grad(set_to_none=False)``),
one ``step()`` of:

* torch's fused SGD and AdamW (no trust ratio), and torch's ``clip_grad_norm_`` + fused SGD;
* ``fusedlars.LARS`` two-pass, with and without ``carry_weight_norms``;
* ``fusedlars.LARS(norms_in_backward=True)``, with and without carried weight norms, also with
  ``opt.clip_grad_norm_`` (the norms are recorded before the timed steps, as backward's hooks leave
  them: the hook's own cost belongs to backward and is not timed here);
* ``fusedlars.LAMB`` without and with ``max_grad_norm``, the latter also with ``norms_in_backward``.

With ``--backward --network BATCH SIDE`` the forward and backward are a real ResNet-50's
(fusedlars.tools.resnet) on random images: the hooks' share of a training step as a user sees it.
With ``--backward``, each timed round is instead ``zero_grad()``, a forward and a backward that produce
every grad, then ``step()`` (the hooks' cost inside backward included), for fused SGD, two-pass LARS
and LARS with its norms taken in backward. The forward is one elementwise product and sum per tensor
(``loss = sum((p * x).sum())``): the cheapest backward that writes every grad, so the hooks' share of
the time is as large as it can be; a real network's backward is longer and dilutes it. Each variant
has its own model, and identical models built one after the other ran up to 6% apart on a VM, so
``--backward`` then also times the hooks alone: one model's forward and backward with the hooks
registered and without, alternating, and prints their cost per backward.

Prints the medians, their IQRs and the ratios that issue #25 names. Timings drift between runs on a
shared machine: read the ratios of one run, and repeat the run. ``fusedlars bench --norms-in-backward
--clip`` times the same steps inside the bench's harness (with its bandwidth probe and reliability
checks).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fusedlars
from fusedlars.tools.shapes import SHAPE_SETS


class ClipThenStep:
    def __init__(self, opt, params, ours: bool) -> None:
        self.opt, self.params, self.ours = opt, params, ours

    def step(self) -> None:
        if self.ours:
            self.opt.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()


#: the hyperparameters of every LARS variant and of the fused SGD it is compared with
LARS_KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)


def variants() -> dict:
    lamb = dict(lr=1e-3, weight_decay=0.01)

    def sgd(ps):
        return torch.optim.SGD(ps, fused=True, **LARS_KW)

    return {
        "torch SGD(fused)": sgd,
        "torch clip_grad_norm_ + SGD(fused)": lambda ps: ClipThenStep(sgd(ps), ps, False),
        "LARS": lambda ps: fusedlars.LARS(ps, **LARS_KW),
        "LARS carry": lambda ps: fusedlars.LARS(ps, carry_weight_norms=True, **LARS_KW),
        "LARS bwd": lambda ps: fusedlars.LARS(ps, norms_in_backward=True, **LARS_KW),
        "LARS bwd carry": lambda ps: fusedlars.LARS(ps, norms_in_backward=True, carry_weight_norms=True, **LARS_KW),
        "LARS + clip": lambda ps: ClipThenStep(fusedlars.LARS(ps, **LARS_KW), ps, True),
        "LARS bwd carry + clip": lambda ps: ClipThenStep(
            fusedlars.LARS(ps, norms_in_backward=True, carry_weight_norms=True, **LARS_KW), ps, True
        ),
        "torch AdamW(fused)": lambda ps: torch.optim.AdamW(ps, fused=True, **lamb),
        "LAMB": lambda ps: fusedlars.LAMB(ps, **lamb),
        "LAMB max_grad_norm": lambda ps: fusedlars.LAMB(ps, max_grad_norm=1.0, **lamb),
        "LAMB bwd max_grad_norm": lambda ps: fusedlars.LAMB(ps, max_grad_norm=1.0, norms_in_backward=True, **lamb),
    }


def backward_variants(device: torch.device | None = None) -> dict:
    """fused SGD, two-pass LARS, LARS with norms from backward (and carried weight norms where the
    device's backend carries them: the cpu backend; on a GPU the step's norm pass reads the weights)."""
    carry = device is None or device.type == "cpu"
    return {
        "torch SGD(fused)": lambda ps: torch.optim.SGD(ps, fused=True, **LARS_KW),
        "LARS": lambda ps: fusedlars.LARS(ps, **LARS_KW),
        "LARS bwd carry": lambda ps: fusedlars.LARS(ps, norms_in_backward=True, carry_weight_norms=carry, **LARS_KW),
    }


def _rotated(runs: dict, i: int) -> list:
    """Round ``i``'s order: the variants' items, starting at the ``i``-th (mod their number), so that
    drift and a variant's position in a round hit every variant alike, as in the bench."""
    items = list(runs.items())
    k = i % len(items)
    return items[k:] + items[:k]


def _workload(shapes, network: tuple[int, int] | None, dev: torch.device):
    """(params, loss function) of one timed model: one product and sum per tensor of ``shapes``, or
    with ``network`` (batch, image side) a real ResNet-50 (fusedlars.tools.resnet) on random images.
    Seeded, so every call builds the same values."""
    torch.manual_seed(0)
    if network is None:
        ps = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.1) for s in shapes]
        xs = [torch.randn(s, device=dev) * 0.01 for s in shapes]
        return ps, lambda: sum((p * x).sum() for p, x in zip(ps, xs))
    from .resnet import ResNet50

    model = ResNet50().to(dev)
    images = torch.randn(network[0], 3, network[1], network[1], device=dev)
    return list(model.parameters()), lambda: model(images).logsumexp(1).mean()


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA step is timed to its end, not to its launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backward_and_step(
    shapes, rounds: int, network: tuple[int, int] | None = None, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per round of zero_grad + forward + backward + step, interleaved round-robin (the
    starting variant rotates every round).
    ``network`` (batch, image side): a real ResNet-50 (fusedlars.tools.resnet) on random images
    instead of the one-product-per-tensor forward."""
    dev = torch.device(device)
    runs = {}
    for name, make in backward_variants(dev).items():
        ps, loss = _workload(shapes, network, dev)
        runs[name] = (ps, loss, make(ps))

    def one(ps, loss, opt) -> None:
        opt.zero_grad()
        loss().backward()
        opt.step()

    for r in runs.values():  # state, buckets
        one(*r)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(rounds):
        for name, r in _rotated(runs, i):
            _sync(dev)
            t0 = time.perf_counter()
            one(*r)
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    return times


def time_hooks(
    shapes, rounds: int, network: tuple[int, int] | None = None, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per zero_grad + forward + backward of ONE model (or one set of tensors), with the hooks
    of ``norms_in_backward=True`` registered and without, alternating (the first rotates every round).
    Identical models built one after the other ran up to 6% apart on a VM, so the hooks' cost is
    taken on one model; no step runs, so nothing else differs."""
    dev = torch.device(device)
    ps, loss = _workload(shapes, network, dev)
    opt = fusedlars.LARS(ps, norms_in_backward=True, **LARS_KW)
    bwd = opt._bwd
    runs = {"backward, hooks on": True, "backward, hooks off": False}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(rounds + 1):  # round 0 warms up
        for name, on in _rotated(runs, i):
            bwd.remove()
            if on:
                bwd.add(ps)
            opt.zero_grad()
            _sync(dev)
            t0 = time.perf_counter()
            loss().backward()
            _sync(dev)
            if i:
                times[name].append(time.perf_counter() - t0)
    if not bwd.taken:
        raise RuntimeError("grad_passes.time_hooks: the hooks of norms_in_backward took no norm")
    return times


def _report(times: dict[str, list[float]]) -> dict[str, float]:
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, v in times.items():
        q = statistics.quantiles(v, n=4)
        print(f"{k:36s} {med[k]:8.2f} ms  IQR {(q[2] - q[0]) * 1e3:6.2f} ms")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60, help="timed rounds (default 60)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--shapes", default="resnet50", choices=sorted(SHAPE_SETS), help="shape set (default resnet50)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: every step is timed to its end")
    ap.add_argument(
        "--backward", action="store_true", help="time zero_grad + forward + backward + step (the hooks' cost included)"
    )
    ap.add_argument(
        "--network", type=int, nargs=2, metavar=("BATCH", "SIDE"),
        help="with --backward: a real ResNet-50's forward and backward on BATCH random SIDExSIDE images "
        "(fusedlars.tools.resnet; --shapes is then ResNet-50's) instead of one product per tensor",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [s for _, s in SHAPE_SETS[args.shapes]()]
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.backward:
        net = tuple(args.network) if args.network else None
        med = _report(time_backward_and_step(shapes, args.rounds, net, dev))
        sgd = med["torch SGD(fused)"]
        print(f"backward + step, in torch SGD(fused) rounds: LARS {med['LARS'] / sgd:.3f}x, "
              f"LARS bwd carry {med['LARS bwd carry'] / sgd:.3f}x")  # fmt: skip
        hk = _report(time_hooks(shapes, args.rounds, net, dev))
        on, off = hk["backward, hooks on"], hk["backward, hooks off"]
        print(f"the hooks of norms_in_backward, on one model: {on - off:+.2f} ms per backward, "
              f"{(on - off) / sgd:+.2%} of a fused-SGD round")  # fmt: skip
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, torch {torch.__version__}, {dev}")
        return
    runs = {}
    for name, make in variants().items():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.1) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, device=dev) * 0.01
        opt = make(ps)
        bwd = getattr(getattr(opt, "opt", opt), "_bwd", None)
        if bwd is not None:  # what backward's hooks would have recorded
            for p in ps:
                bwd._take(p)
        opt.step()  # state, buckets
        runs[name] = opt
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.rounds):
        for name, opt in _rotated(runs, i):
            _sync(dev)
            t0 = time.perf_counter()
            opt.step()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    med = _report(times)
    sgd, clip_sgd, lamb = med["torch SGD(fused)"], med["torch clip_grad_norm_ + SGD(fused)"], med["LAMB"]
    print("in torch SGD(fused) steps: " + ", ".join(f"{k} {med[k] / sgd:.3f}x" for k in
                                                      ("LARS", "LARS carry", "LARS bwd", "LARS bwd carry")))  # fmt: skip
    print(f"in torch clip_grad_norm_ + SGD(fused): LARS + clip {med['LARS + clip'] / clip_sgd:.3f}x, "
          f"LARS bwd carry + clip {med['LARS bwd carry + clip'] / clip_sgd:.3f}x")  # fmt: skip
    print(f"in LAMB steps: LAMB max_grad_norm {med['LAMB max_grad_norm'] / lamb:.3f}x, "
          f"LAMB bwd max_grad_norm {med['LAMB bwd max_grad_norm'] / lamb:.3f}x; "
          f"LAMB in torch AdamW(fused) steps {lamb / med['torch AdamW(fused)']:.3f}x")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, torch {torch.__version__}, {dev}")


if __name__ == "__main__":
    main()
