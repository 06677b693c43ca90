"""Data for the examples: Fashion-MNIST through the toolkit's loader, synthetic data without it."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from sigreg.train.data import DataError, load_dataset


def fashion_mnist(num_train: int, num_test: int) -> tuple[TensorDataset, TensorDataset]:
    """Class-balanced train/test subsets as normalised float images (N, 1, 28, 28) and labels.

    Reads ./data, $SIGREG_DATA or Debian's /usr/share/datasets/fashion-mnist; nothing is
    downloaded. Without Fashion-MNIST, a learnable synthetic set of the same shape.
    """
    try:
        data = load_dataset("fashion-mnist").subset(num_train, num_test)
    except DataError:
        print("Fashion-MNIST not found (apt-get install dataset-fashion-mnist): synthetic data")
        data = load_dataset("synthetic", num_train=num_train, num_test=num_test, image_size=28,
                            channels=1)

    def split(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
        return TensorDataset((images.float() / 255 - data.mean[0]) / data.std[0], labels)

    return split(data.train_images, data.train_labels), split(data.test_images, data.test_labels)
