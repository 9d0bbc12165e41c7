"""Parameter-shape sets for optimizer benchmarks, generated in code (no torchvision, no downloads).

Part of the installed package so that ``fusedlars bench`` runs without the repository; the
suites in ``bench/`` import it from here.

Each set is a function returning a list of ``(name, shape)`` tuples, one per parameter tensor
(trainable parameters only: no BatchNorm running statistics or other buffers), in the order and
with the names of the model's ``named_parameters()``:

* :func:`resnet50`: torchvision ``resnet50`` (ResNet-50 v1.5: stride on the 3x3 conv),
  ImageNet head. 161 tensors, 25,557,032 parameters.
* :func:`vit_b16`: torchvision ``vit_b_16`` (ViT-B/16, 224 px, 1000 classes). 152 tensors,
  86,567,656 parameters.
* :func:`bert_large`: Hugging Face ``BertModel`` for ``bert-large-uncased`` (encoder with
  embeddings and pooler, no MLM/NSP heads). 391 tensors, 335,141,888 parameters.
* :func:`stress`: 2000 tensors of 4096 elements (64 x 64): many small layers, where per-layer
  launch and loop overheads dominate.
* :func:`tiny`: a handful of small, odd-sized tensors (including 1-D and 0-D) for unit tests.

:func:`make_params` turns a shape set into random parameters and gradients.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

Shape = tuple[int, ...]
ShapeList = list[tuple[str, Shape]]

__all__ = [
    "resnet50",
    "vit_b16",
    "bert_large",
    "stress",
    "tiny",
    "SHAPE_SETS",
    "numel",
    "count_params",
    "make_params",
]


# ---------------------------------------------------------------------------------------------
# model layouts


def _bn(prefix: str, channels: int) -> ShapeList:
    return [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,))]


def resnet50(num_classes: int = 1000) -> ShapeList:
    """ResNet-50 v1.5 as laid out by torchvision's ``resnet50`` (He et al. 2016, arXiv:1512.03385).

    Stem ``conv1`` 7x7/2 (no bias) + ``bn1``; four stages ``layer1..layer4`` of 3, 4, 6, 3
    Bottleneck blocks with widths 64, 128, 256, 512 and expansion 4. Each block has ``conv1`` 1x1,
    ``conv2`` 3x3, ``conv3`` 1x1 (all without bias), each followed by a BatchNorm (weight, bias);
    the first block of every stage has a ``downsample`` 1x1 conv + BatchNorm. Head ``fc``
    2048 -> ``num_classes`` with bias. v1.5 puts the stride on ``conv2``, which changes no shape.
    """
    out: ShapeList = [("conv1.weight", (64, 3, 7, 7)), *_bn("bn1", 64)]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            out += [
                (f"{p}.conv1.weight", (planes, inplanes, 1, 1)),
                *_bn(f"{p}.bn1", planes),
                (f"{p}.conv2.weight", (planes, planes, 3, 3)),
                *_bn(f"{p}.bn2", planes),
                (f"{p}.conv3.weight", (planes * 4, planes, 1, 1)),
                *_bn(f"{p}.bn3", planes * 4),
            ]
            if b == 0:  # channel (and, after layer1, stride) change
                out += [
                    (f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1)),
                    *_bn(f"{p}.downsample.1", planes * 4),
                ]
            inplanes = planes * 4
    out += [("fc.weight", (num_classes, 2048)), ("fc.bias", (num_classes,))]
    return out


def vit_b16(num_classes: int = 1000, image_size: int = 224) -> ShapeList:
    """ViT-B/16 as laid out by torchvision's ``vit_b_16`` (Dosovitskiy et al. 2021, arXiv:2010.11929).

    Patch embedding ``conv_proj`` 16x16/16 conv 3 -> 768 with bias; ``class_token`` (1, 1, 768);
    ``encoder.pos_embedding`` (1, (224/16)**2 + 1 = 197, 768); 12 encoder layers, each with
    ``ln_1``, ``self_attention`` (packed ``in_proj_weight`` (3*768, 768) and ``in_proj_bias``,
    ``out_proj`` 768 -> 768), ``ln_2`` and an MLP 768 -> 3072 -> 768 (``mlp.0``, ``mlp.3``);
    a final ``encoder.ln``; the classifier ``heads.head`` 768 -> ``num_classes``.
    """
    d, mlp, layers, patch = 768, 3072, 12, 16
    seq = (image_size // patch) ** 2 + 1
    out: ShapeList = [
        ("class_token", (1, 1, d)),
        ("conv_proj.weight", (d, 3, patch, patch)),
        ("conv_proj.bias", (d,)),
        ("encoder.pos_embedding", (1, seq, d)),
    ]
    for i in range(layers):
        p = f"encoder.layers.encoder_layer_{i}"
        out += [
            (f"{p}.ln_1.weight", (d,)),
            (f"{p}.ln_1.bias", (d,)),
            (f"{p}.self_attention.in_proj_weight", (3 * d, d)),
            (f"{p}.self_attention.in_proj_bias", (3 * d,)),
            (f"{p}.self_attention.out_proj.weight", (d, d)),
            (f"{p}.self_attention.out_proj.bias", (d,)),
            (f"{p}.ln_2.weight", (d,)),
            (f"{p}.ln_2.bias", (d,)),
            (f"{p}.mlp.0.weight", (mlp, d)),
            (f"{p}.mlp.0.bias", (mlp,)),
            (f"{p}.mlp.3.weight", (d, mlp)),
            (f"{p}.mlp.3.bias", (d,)),
        ]
    out += [
        ("encoder.ln.weight", (d,)),
        ("encoder.ln.bias", (d,)),
        ("heads.head.weight", (num_classes, d)),
        ("heads.head.bias", (num_classes,)),
    ]
    return out


def bert_large() -> ShapeList:
    """BERT-large (uncased) as laid out by Hugging Face ``BertModel`` (Devlin et al. 2019, arXiv:1810.04805).

    ``bert-large-uncased`` config: vocab 30522, 512 positions, 2 token types, hidden 1024,
    24 layers, 16 heads (heads do not change shapes), intermediate 4096. Embeddings (word,
    position, token type) + LayerNorm; per layer: ``attention.self`` query/key/value
    1024 -> 1024, ``attention.output.dense`` + LayerNorm, ``intermediate.dense`` 1024 -> 4096,
    ``output.dense`` 4096 -> 1024 + LayerNorm (all Linear layers with bias); ``pooler.dense``
    1024 -> 1024. No pre-training heads (the MLM decoder is tied to the word embeddings anyway).
    """
    vocab, positions, types, d, layers, inter = 30522, 512, 2, 1024, 24, 4096

    def linear(prefix: str, n_out: int, n_in: int) -> ShapeList:
        return [(f"{prefix}.weight", (n_out, n_in)), (f"{prefix}.bias", (n_out,))]

    def ln(prefix: str) -> ShapeList:
        return [(f"{prefix}.weight", (d,)), (f"{prefix}.bias", (d,))]

    out: ShapeList = [
        ("embeddings.word_embeddings.weight", (vocab, d)),
        ("embeddings.position_embeddings.weight", (positions, d)),
        ("embeddings.token_type_embeddings.weight", (types, d)),
        *ln("embeddings.LayerNorm"),
    ]
    for i in range(layers):
        p = f"encoder.layer.{i}"
        out += [
            *linear(f"{p}.attention.self.query", d, d),
            *linear(f"{p}.attention.self.key", d, d),
            *linear(f"{p}.attention.self.value", d, d),
            *linear(f"{p}.attention.output.dense", d, d),
            *ln(f"{p}.attention.output.LayerNorm"),
            *linear(f"{p}.intermediate.dense", inter, d),
            *linear(f"{p}.output.dense", d, inter),
            *ln(f"{p}.output.LayerNorm"),
        ]
    out += linear("pooler.dense", d, d)
    return out


def stress(n_layers: int = 2000, side: int = 64) -> ShapeList:
    """``n_layers`` 2-D tensors of ``side * side`` elements (default 2000 x 4096 = 8,192,000).

    Many small layers: the case where per-layer Python loops and kernel launches dominate.
    2-D so that optimizers which skip 1-D tensors still adapt every layer.
    """
    return [(f"layer{i}.weight", (side, side)) for i in range(n_layers)]


def tiny() -> ShapeList:
    """A few small, odd-sized tensors (4-D, 2-D, 1-D and a 0-D scalar) for unit tests."""
    return [
        ("conv.weight", (8, 3, 3, 3)),
        ("bn.weight", (8,)),
        ("bn.bias", (8,)),
        ("fc1.weight", (33, 72)),
        ("fc1.bias", (33,)),
        ("fc2.weight", (10, 33)),
        ("fc2.bias", (10,)),
        ("odd", (7, 13, 5)),
        ("scale", ()),
        ("one", (1,)),
    ]


SHAPE_SETS: dict[str, Callable[[], ShapeList]] = {
    "resnet50": resnet50,
    "vit_b16": vit_b16,
    "bert_large": bert_large,
    "stress": stress,
    "tiny": tiny,
}


# ---------------------------------------------------------------------------------------------
# counting and materialisation


def numel(shape: Shape) -> int:
    """Number of elements of one shape (1 for a 0-D shape)."""
    return math.prod(shape)


def count_params(shapes: ShapeList) -> int:
    """Total number of elements over a shape set."""
    return sum(numel(s) for _, s in shapes)


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes, or None when it cannot be determined."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def make_params(
    shapes: ShapeList,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    scale: float = 1.0,
    *,
    grad_scale: float = 0.01,
    attach_grads: bool = True,
    headroom: float = 0.8,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random parameters and gradients for a shape set.

    ``params[i] = scale * N(0, 1)`` and ``grads[i] = scale * grad_scale * N(0, 1)``, each of
    ``shapes[i]``'s shape, drawn directly in ``dtype`` on ``device`` from one
    ``torch.Generator`` seeded with ``seed`` (same seed, device and dtype: same values). The
    params are plain leaf tensors (``requires_grad=False``, so benchmarks may update them in
    place outside ``torch.no_grad``); with ``attach_grads`` each ``params[i].grad`` is set to
    ``grads[i]`` so they can go straight into a ``torch.optim.Optimizer``.

    Raises ``MemoryError`` before allocating anything when params plus grads would take more
    than ``headroom`` of the device's currently free memory. Optimizer state (momentum, Adam
    moments) comes on top of this and is not counted.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    total = count_params(shapes)
    need = 2 * total * torch.empty((), dtype=dtype).element_size()
    free = _available_bytes(device)
    if free is not None and need > headroom * free:
        raise MemoryError(
            f"make_params needs {need / 2**30:.2f} GiB for {total:,} params + grads in {dtype} "
            f"on {device}, but only {free / 2**30:.2f} GiB is free (headroom {headroom}); "
            "use a smaller shape set or a narrower dtype"
        )
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    params: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for _name, shape in shapes:
        p = torch.randn(shape, generator=gen, dtype=dtype, device=device)
        g = torch.randn(shape, generator=gen, dtype=dtype, device=device)
        if scale != 1.0:
            p.mul_(scale)
        g.mul_(scale * grad_scale)
        if attach_grads:
            p.grad = g
        params.append(p)
        grads.append(g)
    return params, grads
