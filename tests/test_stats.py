"""opt.stats() comes from the norms the step computed; checked against the reference backend
and against norms computed here independently."""

import csv

import pytest
import torch

import fusedlars
from fusedlars.stats import StatsLogger

from helpers import grads_for, make_params

SHAPES = [(3,), (17, 5), (0,), (4097,)]


@pytest.mark.parametrize("kind", ["LARS", "LAMB"])
def test_stats_match_reference_and_independent_norms(kind):
    runs = {}
    for backend in ("reference", "torch"):
        ps = make_params(SHAPES, torch.float64)
        opt = getattr(fusedlars, kind)(ps, lr=0.01, weight_decay=1e-3, backend=backend)
        for t in range(3):
            gs = grads_for(SHAPES, t)
            w_before = [p.detach().clone() for p in ps]
            for p, g in zip(ps, gs):
                p.grad = g
            opt.step()
        runs[backend] = (opt.stats(), w_before, gs)
    ref, w_before, gs = runs["reference"]
    got = runs["torch"][0]
    assert got["names"] == ref["names"]
    for k in ("weight_norm", "grad_norm", "update_norm", "trust_ratio", "effective_lr"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-9)
    # independent check of the grad norms, and of the LARS weight norms (before the step)
    torch.testing.assert_close(got["grad_norm"], torch.stack([g.norm() for g in gs]).float(), rtol=1e-6, atol=0)
    if kind == "LARS":
        torch.testing.assert_close(
            got["weight_norm"], torch.stack([w.norm() for w in w_before]).float(), rtol=1e-6, atol=0
        )
        lr = 0.01
        torch.testing.assert_close(got["effective_lr"], got["trust_ratio"] * lr)


def test_stats_logger_writes_csv(tmp_path):
    ps = make_params(SHAPES, torch.float32)
    opt = fusedlars.LARS(ps, lr=0.1)
    path = tmp_path / "stats.csv"
    with StatsLogger(opt, path, every=2) as log:
        for t in range(4):
            for p, g in zip(ps, grads_for(SHAPES, t)):
                p.grad = g.float()
            opt.step()
            log.step()
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 2 * len(SHAPES)
    assert {r["step"] for r in rows} == {"2", "4"}
    assert float(rows[-1]["trust_ratio"]) == pytest.approx(opt.stats()["trust_ratio"][-1].item(), rel=1e-6)
