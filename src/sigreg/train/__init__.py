"""sigreg.train: the training toolkit (data, augmentation, models, optimizers, trainer, CLI)."""
