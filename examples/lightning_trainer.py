"""SIGReg with PyTorch Lightning: ``SIGRegCallback`` on the Trainer, one line in
``training_step``. A 6-layer vanilla MLP on 20k Fashion-MNIST images, 2 epochs.

    python examples/lightning_trainer.py              # about 10 s on 2 idle CPU cores
    python examples/lightning_trainer.py --no-sigreg  # the same module, without the callback

The CSV logs (runs/examples/lightning/) hold ``sigreg/loss``, ``sigreg/loss/<layer>`` and
``sigreg/eff_dim/<layer>`` next to ``train_loss`` and ``val_acc``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from _data import fashion_mnist
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from sigreg.integrations.lightning import SIGRegCallback, regularize
from sigreg.train.models import build_model


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.mlp = build_model("mlp", num_classes=10, image_size=28, in_channels=1, depth=6,
                               width=256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return regularize(self, loss)        # the one line: task loss + SIGReg

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit-batches", type=int, default=None,
                        help="train and validate on this many batches an epoch (tests)")
    parser.add_argument("--no-sigreg", action="store_true")
    parser.add_argument("--out", default="runs/examples/lightning")
    args = parser.parse_args(argv)

    L.seed_everything(0)
    train, test = fashion_mnist(num_train=20000, num_test=2000)
    # The hidden Linear layers of the LightningModule ("mlp.layers.0" ...), weak SIGReg.
    callbacks = [] if args.no_sigreg else [SIGRegCallback("mlp.layers.*", alpha=0.1)]
    trainer = L.Trainer(
        max_epochs=args.epochs, limit_train_batches=args.limit_batches,
        limit_val_batches=args.limit_batches, callbacks=callbacks,
        gradient_clip_val=1.0, logger=CSVLogger(args.out, name=""), log_every_n_steps=25,
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Classifier(), DataLoader(train, batch_size=128, shuffle=True),
                DataLoader(test, batch_size=1000))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"val_acc {metrics['val_acc']:.1%}; logs in {trainer.logger.log_dir}")
    return metrics


if __name__ == "__main__":
    main()
