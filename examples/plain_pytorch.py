"""SIGReg in a hand-written PyTorch loop: a 6-layer vanilla MLP (no normalisation, no
residuals) trained with plain SGD on 20k Fashion-MNIST images for 2 epochs.

    python examples/plain_pytorch.py              # about 10 s on 2 idle CPU cores
    python examples/plain_pytorch.py --no-sigreg  # the same run without the regularizer
"""

from __future__ import annotations

import argparse
from itertools import pairwise

import torch
from _data import fashion_mnist
from torch import nn
from torch.utils.data import DataLoader

import sigreg  # the core alone: this script needs nothing but torch


class MLP(nn.Module):
    """Flatten -> 5 x [Linear -> ReLU] -> Linear classifier; PyTorch's default init."""

    def __init__(self, depth: int = 6, width: int = 256, inputs: int = 28 * 28,
                 classes: int = 10) -> None:
        super().__init__()
        dims = [inputs] + [width] * (depth - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    model.train()
    return hits / len(loader.dataset)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (tests)")
    parser.add_argument("--no-sigreg", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    train, test = fashion_mnist(num_train=20000, num_test=2000)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Every hidden Linear layer's pre-activation; weak SIGReg, K=64, 0.9 * task + 0.1 * reg.
    handle = None if args.no_sigreg else sigreg.attach(model, "layers.*", alpha=0.1)

    step = 0
    for epoch in range(args.epochs):
        for x, y in DataLoader(train, batch_size=128, shuffle=True):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if handle is not None:
                loss = handle.combine(loss)          # the one line
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step == args.max_steps:
                break
        acc = accuracy(model, DataLoader(test, batch_size=1000))
        reg = "" if handle is None else "  SIGReg per layer: " + " ".join(
            f"{v:.2f}" for v in handle.layer_losses().values())
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}  test acc {acc:.1%}{reg}")
        if step == args.max_steps:
            break
    return acc


if __name__ == "__main__":
    main()
