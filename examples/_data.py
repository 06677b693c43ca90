"""Data for the examples: Fashion-MNIST through the toolkit's loader, synthetic data without it."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

try:
    from sigreg.train.data import DataError, load_dataset
except ImportError:  # a core-only install (torch alone): no [train] extra, no dataset loader
    load_dataset = None


def fashion_mnist(num_train: int, num_test: int) -> tuple[TensorDataset, TensorDataset]:
    """Class-balanced train/test subsets as normalised float images (N, 1, 28, 28) and labels.

    Reads ./data, $SIGREG_DATA or Debian's /usr/share/datasets/fashion-mnist with the toolkit's
    loader (the [train] extra); nothing is downloaded. Without either, a learnable synthetic
    set of the same shape, made with torch alone.
    """
    if load_dataset is None:
        print("no [train] extra (pip install 'sigreg[train]') to read Fashion-MNIST: "
              "synthetic data")
        return synthetic(num_train), synthetic(num_test)
    try:
        data = load_dataset("fashion-mnist").subset(num_train, num_test)
    except DataError:
        print("Fashion-MNIST not found (apt-get install dataset-fashion-mnist): synthetic data")
        return synthetic(num_train), synthetic(num_test)

    def split(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
        return TensorDataset((images.float() / 255 - data.mean[0]) / data.std[0], labels)

    return split(data.train_images, data.train_labels), split(data.test_images, data.test_labels)


def synthetic(num: int, num_classes: int = 10) -> TensorDataset:
    """``num`` images (N, 1, 28, 28), about zero mean and unit variance: each class a smooth
    random prototype (the same for every call) plus noise."""
    prototypes = torch.rand(num_classes, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    prototypes = torch.nn.functional.interpolate(prototypes, size=(28, 28), mode="bilinear")
    labels = torch.arange(num) % num_classes
    labels = labels[torch.randperm(num)]
    images = prototypes[labels] + 0.15 * torch.randn(num, 1, 28, 28)
    return TensorDataset((images - 0.5) / 0.3, labels)
