"""fusedlars LAMB in a Hugging Face ``Trainer``, with a tiny BERT built from a config.

    python examples/hf_trainer_lamb.py

Build the optimizer and scheduler yourself and hand them over with
``Trainer(optimizers=(opt, sched))``; the Trainer then steps them as its own (it wraps the
optimizer in accelerate's ``AcceleratedOptimizer``, clips gradients with ``max_grad_norm``, calls
``model.zero_grad()``). The usual BERT grouping: no weight decay on biases and LayerNorm
weights, which also keeps them out of LAMB's trust ratio (``fusedlars.param_groups`` does both).
Nothing is downloaded: the model is a 2-layer, 32-wide ``BertForSequenceClassification`` from a
``BertConfig``, trained on a synthetic task (is token 7 in the sequence?).
"""

from __future__ import annotations

import tempfile

import torch

import fusedlars
from fusedlars.schedules import WarmupCosine

VOCAB, SEQ = 64, 16


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, VOCAB, (n, SEQ), generator=g)
        has = torch.rand(n, generator=g) < 0.5
        pos = torch.randint(1, SEQ, (n,), generator=g)
        self.ids[has, pos[has]] = 7
        self.ids[:, 0] = 2  # [CLS]
        self.labels = has.long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.labels[i]}


def make_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(cfg)


def main(max_steps: int = 120, lr: float = 2e-2, output_dir: str | None = None) -> dict[str, float]:
    import transformers
    from transformers import Trainer, TrainingArguments

    model = make_model()
    # BERT's grouping: no decay (and no trust ratio) on biases and LayerNorm weights
    groups = fusedlars.param_groups(model, weight_decay=0.01)
    opt = fusedlars.LAMB(groups, lr=lr, preset="apex")  # apex/NVIDIA BERT LAMB semantics
    sched = WarmupCosine(opt, warmup_steps=max_steps // 10, total_steps=max_steps)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp, max_steps=max_steps, per_device_train_batch_size=32,
            per_device_eval_batch_size=256, logging_steps=max_steps, save_strategy="no", report_to=[],
            use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=Synthetic(2048, 0), eval_dataset=Synthetic(512, 1),
                          optimizers=(opt, sched))  # fmt: skip
        train = trainer.train()
        pred = trainer.predict(Synthetic(512, 1))
    acc = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    first = next(h["loss"] for h in trainer.state.log_history if "loss" in h) if trainer.state.log_history else None
    print(f"transformers {transformers.__version__}, fusedlars.LAMB: train loss {train.training_loss:.3f}, "
          f"eval accuracy {acc:.1%} after {max_steps} steps")  # fmt: skip
    return {"train_loss": train.training_loss, "accuracy": acc, "logged_loss": first}


if __name__ == "__main__":
    main()
