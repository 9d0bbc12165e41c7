"""Benchmark shape sets (parameter counts, layouts) and the unfused LARS baselines."""

import pytest
import torch
from torch import nn

from fusedlars.tools import baselines, shapes
from fusedlars.tools.shapes import SHAPE_SETS, count_params, make_params

# Published totals: torchvision model docs (resnet50 25,557,032; vit_b_16 86,567,656) and
# Hugging Face BertModel for bert-large-uncased (335,141,888).
EXPECTED = {
    "resnet50": (161, 25_557_032),
    "vit_b16": (152, 86_567_656),
    "bert_large": (391, 335_141_888),
    "stress": (2000, 2000 * 4096),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts(name):
    shp = SHAPE_SETS[name]()
    n_tensors, n_params = EXPECTED[name]
    assert len(shp) == n_tensors
    assert count_params(shp) == n_params
    names = [n for n, _ in shp]
    assert len(set(names)) == len(names)
    assert all(isinstance(s, tuple) and all(isinstance(d, int) and d > 0 for d in s) for _, s in shp)


def test_shape_set_registry():
    assert set(SHAPE_SETS) == {"resnet50", "vit_b16", "bert_large", "stress", "tiny"}
    assert all(s.numel() == 4096 for s in (torch.Size(x) for _, x in shapes.stress()))
    assert count_params(shapes.tiny()) < 10_000


# -- layouts cross-checked against torch.nn modules built on the meta device -------------------
# The module trees below mirror torchvision / Hugging Face attribute names; named_parameters()
# then gives the names, order and shapes without allocating memory.


class _Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )


class _ResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        for i, (planes, n) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], 1):
            blocks = []
            for b in range(n):
                blocks.append(_Bottleneck(inplanes, planes, 2 if (b == 0 and i > 1) else 1, b == 0))
                inplanes = planes * 4
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.fc = nn.Linear(2048, 1000)


class _EncoderBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(768)
        self.self_attention = nn.MultiheadAttention(768, 12, batch_first=True)
        self.ln_2 = nn.LayerNorm(768)
        self.mlp = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Dropout(), nn.Linear(3072, 768))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, 197, 768))
        self.layers = nn.Sequential()
        for i in range(12):
            self.layers.add_module(f"encoder_layer_{i}", _EncoderBlock())
        self.ln = nn.LayerNorm(768)


class _ViTB16(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, 768, 16, 16)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 768))
        self.encoder = _Encoder()
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(768, 1000))


def _bert_large():
    d = 1024

    def layer():
        return nn.ModuleDict(
            dict(
                attention=nn.ModuleDict(
                    dict(
                        self=nn.ModuleDict(dict(query=nn.Linear(d, d), key=nn.Linear(d, d), value=nn.Linear(d, d))),
                        output=nn.ModuleDict(dict(dense=nn.Linear(d, d), LayerNorm=nn.LayerNorm(d))),
                    )
                ),
                intermediate=nn.ModuleDict(dict(dense=nn.Linear(d, 4096))),
                output=nn.ModuleDict(dict(dense=nn.Linear(4096, d), LayerNorm=nn.LayerNorm(d))),
            )
        )

    return nn.ModuleDict(
        dict(
            embeddings=nn.ModuleDict(
                dict(
                    word_embeddings=nn.Embedding(30522, d),
                    position_embeddings=nn.Embedding(512, d),
                    token_type_embeddings=nn.Embedding(2, d),
                    LayerNorm=nn.LayerNorm(d),
                )
            ),
            encoder=nn.ModuleDict(dict(layer=nn.ModuleList([layer() for _ in range(24)]))),
            pooler=nn.ModuleDict(dict(dense=nn.Linear(d, d))),
        )
    )


@pytest.mark.parametrize(
    "name, build",
    [("resnet50", _ResNet50), ("vit_b16", _ViTB16), ("bert_large", _bert_large)],
)
def test_layout_matches_nn_modules(name, build):
    with torch.device("meta"):
        model = build()
    want = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    got = SHAPE_SETS[name]()
    if name == "vit_b16":
        # torchvision registers class_token on the top module, so it comes first there
        want.sort(key=lambda item: item[0] != "class_token")
    assert got == want


# -- make_params ------------------------------------------------------------------------------


def test_make_params_deterministic_and_attached():
    shp = shapes.tiny()
    p1, g1 = make_params(shp, seed=3, scale=0.5)
    p2, g2 = make_params(shp, seed=3, scale=0.5)
    p3, _ = make_params(shp, seed=4, scale=0.5)
    assert [tuple(p.shape) for p in p1] == [s for _, s in shp]
    assert all(torch.equal(a, b) for a, b in zip(p1 + g1, p2 + g2))
    assert not torch.equal(p1[0], p3[0])
    assert all(p.grad is g for p, g in zip(p1, g1))
    assert all(p.dtype == torch.float32 and p.is_leaf and not p.requires_grad for p in p1)
    big = torch.cat([p.flatten() for p in p1])
    assert 0.3 < big.std().item() < 0.7  # scale 0.5


def test_make_params_dtype_and_no_attach():
    p, g = make_params(shapes.tiny(), dtype=torch.bfloat16, attach_grads=False)
    assert all(t.dtype == torch.bfloat16 for t in p + g)
    assert all(t.grad is None for t in p)


def test_make_params_refuses_oversized_request():
    with pytest.raises(MemoryError, match="GiB"):
        make_params([("huge", (10**7, 10**7))])


# -- baselines --------------------------------------------------------------------------------


def _reference_lars_f64(params, grads_per_step, *, lr, momentum, weight_decay, trust_coefficient, eps):
    """Module-docstring formula, float64, Python branches (test oracle); the baselines' keywords."""
    wd, eta = weight_decay, trust_coefficient
    ws = [p.double().clone() for p in params]
    bufs = [torch.zeros_like(w) for w in ws]
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(ws, grads)):
            g = g.double()
            wn, gn = w.norm().item(), g.norm().item()
            r = eta * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
            bufs[i] = momentum * bufs[i] + r * (g + wd * w)
            ws[i] = w - lr * bufs[i]
    return ws


def _run(cls, params0, grads_per_step, **hyper):
    params = [p.clone() for p in params0]
    opt = cls(params, **hyper)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, [opt.state[p]["momentum_buffer"] for p in params]


@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=0.5, momentum=0.9, weight_decay=1e-4, trust_coefficient=1e-3, eps=1e-8),
        dict(lr=2.0, momentum=0.0, weight_decay=0.0, trust_coefficient=2e-2, eps=0.0),
        dict(lr=1.0, momentum=0.95, weight_decay=5e-4, trust_coefficient=1e-3, eps=1e-8),
    ],
)
def test_baselines_agree(hyper):
    params0, _ = make_params(shapes.tiny(), seed=0, scale=0.2, attach_grads=False)
    params0[1].zero_()  # zero weight norm -> ratio 1
    gen = torch.Generator().manual_seed(1)
    grads_per_step = []
    for step in range(5):
        grads = [0.01 * torch.randn(p.shape, generator=gen) for p in params0]
        if step == 2:
            grads[3].zero_()  # zero grad norm -> ratio 1
        grads_per_step.append(grads)

    pp, pb = _run(baselines.PerParamLARS, params0, grads_per_step, **hyper)
    fp, fb = _run(baselines.ForeachLARS, params0, grads_per_step, **hyper)
    for a, b in zip(pp + pb, fp + fb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)

    want = _reference_lars_f64(params0, grads_per_step, **hyper)
    for a, b in zip(pp, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)


def test_baselines_registry_and_groups():
    assert set(baselines.BASELINES) == {"per_param", "foreach"}
    p, _ = make_params(shapes.tiny(), seed=5)
    q = [t.clone() for t in p]
    for t, s in zip(q, p):
        t.grad = s.grad.clone()

    def groups(ps):
        return [{"params": ps[:4], "lr": 0.1}, {"params": ps[4:], "lr": 0.3, "weight_decay": 1e-3}]

    o1 = baselines.PerParamLARS(groups(p), lr=1.0)
    o2 = baselines.ForeachLARS(groups(q), lr=1.0)
    for _ in range(3):
        o1.step()
        o2.step()
    for a, b in zip(p, q):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="momentum"):
        baselines.ForeachLARS(p, lr=1.0, momentum=1.5)


def test_the_timing_resnet50_has_the_resnet50_layout():
    """grad_passes --network times a real ResNet-50: its params are the shape set's, name for name."""
    from fusedlars.tools.resnet import ResNet50
    from fusedlars.tools.shapes import resnet50

    model = ResNet50()
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == [(n, tuple(s)) for n, s in resnet50()]
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1000)


def test_grad_passes_rotates_the_variants_every_round():
    """grad_passes times its variants round-robin with the first one rotating, as the bench does: with a
    fixed order a variant's place in the round moved its time by ~3% on a VM (docs/numbers.md)."""
    from fusedlars.tools import grad_passes
    from fusedlars.tools.shapes import tiny

    runs = {"a": 1, "b": 2, "c": 3}
    assert [[k for k, _ in grad_passes._rotated(runs, i)] for i in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]
    ]  # fmt: skip
    times = grad_passes.time_backward_and_step([s for _, s in tiny()], rounds=4)
    assert set(times) == set(grad_passes.backward_variants()) and all(len(t) == 4 for t in times.values())
    hooks = grad_passes.time_hooks([s for _, s in tiny()], rounds=2)  # one model, hooks on and off
    assert set(hooks) == {"backward, hooks on", "backward, hooks off"} and all(len(t) == 2 for t in hooks.values())
