"""Tools around the optimizers, not part of the optimizer core.

* :mod:`fusedlars.tools.bench`: the benchmark harness behind ``fusedlars bench``;
* :mod:`fusedlars.tools.demo`: the small-CNN training demo behind ``fusedlars demo``;
* :mod:`fusedlars.tools.plot`: plots of StatsLogger CSVs (``fusedlars plot``);
* :mod:`fusedlars.tools.reproduce`: the TVLARS paper in miniature, tuned on validation (``fusedlars reproduce``);
* :mod:`fusedlars.tools.shapes`: the parameter-shape sets the benchmarks run (ResNet-50, ViT-B/16, BERT-large, ...);
* :mod:`fusedlars.tools.baselines`: the unfused LARS baselines (the same math in plain PyTorch);
* :mod:`fusedlars.tools.grad_passes`: the cost of each pass over the grads (two-pass LARS, norms taken in
  backward, clipping), ``python -m fusedlars.tools.grad_passes``;
* :mod:`fusedlars.tools.fsdp2_step`: the FSDP2-sharded step against the unsharded one on the same local
  element count, ``python -m fusedlars.tools.fsdp2_step``.

Every measurement program lives here. ``bench/`` holds only what drives them in a test runner: the
pytest-benchmark suites and the GPU check (``bench/gpu_check.sh`` with its kernel and AOT scripts).

Nothing in :mod:`fusedlars.optim` or :mod:`fusedlars.backends` imports these modules.
"""
