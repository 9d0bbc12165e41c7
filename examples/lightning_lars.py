"""fusedlars in a Lightning ``configure_optimizers``.

    python examples/lightning_lars.py

Return the optimizer and a per-step scheduler as Lightning expects them; nothing else changes.
Lightning calls ``optimizer.step(closure)`` (fusedlars runs the closure, as torch.optim does),
``optimizer.zero_grad()``, and with ``precision="16-mixed"`` on a GPU its ``GradScaler`` (fusedlars
unscales inside its step). A LARS lr is not SGD's: see the README's "Learning rates".

The script fits a small CNN on scikit-learn's digits for a few epochs on the CPU and prints the
test accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

import fusedlars
from fusedlars.schedules import WarmupCosine

try:
    import lightning as L
except ImportError:  # the older package name
    import pytorch_lightning as L


class DigitsModule(L.LightningModule):
    def __init__(self, lr: float = 5.0, weight_decay: float = 1e-4, warmup_frac: float = 0.2):
        super().__init__()
        self.save_hyperparameters()
        from fusedlars.tools.demo import SmallCNN

        self.model = SmallCNN()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        opt = fusedlars.LARS(fusedlars.param_groups(self.model, weight_decay=hp.weight_decay), lr=hp.lr, momentum=0.9)
        total = self.trainer.estimated_stepping_batches
        sched = WarmupCosine(opt, warmup_steps=int(hp.warmup_frac * total), total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loaders(batch_size: int = 128):
    from torch.utils.data import DataLoader, TensorDataset

    from fusedlars.tools.demo import load_digits

    x_tr, y_tr, x_te, y_te = load_digits()
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True, generator=g), (x_te, y_te)


def main(epochs: int = 3, **trainer_kwargs) -> float:
    L.seed_everything(0, verbose=False)
    train, (x_te, y_te) = loaders()
    module = DigitsModule()
    kw = dict(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    kw.update(trainer_kwargs)
    L.Trainer(**kw).fit(module, train)
    module.eval()
    with torch.no_grad():
        acc = (module(x_te).argmax(1) == y_te).float().mean().item()
    print(f"Lightning {L.__version__}, fusedlars.LARS: test accuracy {acc:.1%} after {epochs} epochs")
    return acc


if __name__ == "__main__":
    main()
