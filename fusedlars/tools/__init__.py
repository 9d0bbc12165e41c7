"""Tools around the optimizers, not part of the optimizer core.

* :mod:`fusedlars.tools.bench`: the benchmark harness behind ``fusedlars bench``;
* :mod:`fusedlars.tools.demo`: the small-CNN training demo behind ``fusedlars demo``;
* :mod:`fusedlars.tools.plot`: plots of StatsLogger CSVs (``fusedlars plot``);
* :mod:`fusedlars.tools.reproduce`: the TVLARS paper in miniature, tuned on validation (``fusedlars reproduce``);
* :mod:`fusedlars.tools.shapes`: the parameter-shape sets the benchmarks run (ResNet-50, ViT-B/16, BERT-large, ...);
* :mod:`fusedlars.tools.baselines`: the unfused LARS baselines (the same math in plain PyTorch).

Nothing in :mod:`fusedlars.optim` or :mod:`fusedlars.kernels` imports these modules.
"""
