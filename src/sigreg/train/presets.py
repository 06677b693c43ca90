"""Named training presets: one per row of the paper's tables, plus CPU-scale Fashion-MNIST ones.

A preset is a :class:`TrainConfig` and a line of text; names read
``<model>-<optimizer>-<mix|nomix>-<none|weak|strong>``. The Fashion-MNIST families also have
``-vicreg``: VICReg's variance + covariance terms, the baseline of docs/studies.md. ``paper``
holds the top-1 the paper reports for that row on CIFAR-100 (best epoch), for the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import TrainConfig


@dataclass(frozen=True)
class Preset:
    name: str
    config: TrainConfig
    description: str
    paper: float | None = None  # reported CIFAR-100 top-1 (%), if this row is in the paper


PRESETS: dict[str, Preset] = {}
VARIANTS = ("none", "strong", "weak")

CIFAR100 = dict(dataset="cifar100", batch_size=128, epochs=400, crop_padding=4, flip=True)
PAPER_AUG = dict(randaugment_ops=2, randaugment_magnitude=9, mixup_alpha=0.8, cutmix_alpha=1.0)
# The paper's supervised code: K=64 sketch/directions, alpha=0.1, strong over [-5, 5] with
# 17 nodes (9 on [0, 5]), a fresh sketch every step.
PAPER_SIGREG = dict(alpha=0.1, sketch_dim=64, sketch="resample", t_max=5.0, num_points=9)

PAPER_VIT = dict(model="paper-vit", optimizer="adamw", lr=1e-3, weight_decay=5e-4,
                 schedule="cosine", eta_min=0.0, grad_clip=0.0)
PEAK_VIT = dict(model="peak-vit", optimizer="adamw", lr=1e-3, weight_decay=0.05,
                schedule="cosine", eta_min=1e-5, grad_clip=1.0)
MUON = dict(optimizer="muon", muon_lr=1e-2, lr=1e-3, muon_adamw_betas=(0.9, 0.95))
MLP = dict(model="mlp", optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0,
           schedule="constant", grad_clip=1.0)
RESNET = dict(model="resnet18", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
              schedule="cosine")

# (stem, description, settings, reported none/strong/weak)
PAPER_ROWS = [
    ("paper-vit-adamw-mix", "paper ViT, AdamW, RandAugment + MixUp/CutMix (the collapse)",
     {**PAPER_VIT, **PAPER_AUG}, (20.73, 70.20, 72.02)),
    ("paper-vit-muon-nomix", "paper ViT, Muon + AdamW, RandAugment, no MixUp/CutMix",
     {**PAPER_VIT, **MUON, "randaugment_ops": 2}, (58.77, 63.16, 67.52)),
    ("paper-vit-muon-mix", "paper ViT, Muon + AdamW, RandAugment + MixUp/CutMix",
     {**PAPER_VIT, **MUON, **PAPER_AUG}, (62.44, 74.34, 74.56)),
    ("peak-vit-adamw-mix", "expert-tuned ViT, AdamW, RandAugment + MixUp/CutMix",
     {**PEAK_VIT, **PAPER_AUG}, (70.76, 72.71, 71.65)),
    ("peak-vit-muon-mix", "expert-tuned ViT, Muon + AdamW, RandAugment + MixUp/CutMix",
     {**PEAK_VIT, **MUON, **PAPER_AUG}, (75.87, 76.98, 76.24)),
    ("mlp-sgd-nomix", "vanilla 6-layer MLP, plain SGD, crop + flip",
     dict(MLP), (26.77, 35.99, 42.17)),
    ("mlp-sgd-mix", "vanilla 6-layer MLP, plain SGD, crop + flip + MixUp/CutMix",
     {**MLP, "mixup_alpha": 0.8, "cutmix_alpha": 1.0}, (38.08, 38.70, 38.40)),
    ("resnet18-sgd-nomix", "ResNet-18, SGD momentum, 1600 epochs, crop + flip",
     {**RESNET, "epochs": 1600}, (79.03, 78.86, 79.42)),
    ("resnet18-sgd-mix", "ResNet-18, SGD momentum, 400 epochs, crop + flip + MixUp/CutMix",
     {**RESNET, "mixup_alpha": 0.8, "cutmix_alpha": 1.0}, (82.13, 81.18, 82.13)),
]

# CPU scale: Fashion-MNIST (Debian's dataset-fashion-mnist). Settings found by
# experiments/demo_search.py; see docs/cpu-scale-results.md.
FMNIST = dict(dataset="fashion-mnist", batch_size=128, crop_padding=2, flip=True, monitor_every=25)
FMNIST_SIGREG = dict(alpha=0.1, sketch_dim=64, sketch="resample", t_max=3.0, num_points=17)
CPU_ROWS = [
    ("fmnist-mlp", "Fashion-MNIST, 10-layer vanilla MLP width 256, plain SGD, 5 epochs (the demo)",
     {**FMNIST, **MLP, "model_args": {"depth": 10, "width": 256}, "epochs": 5}),
    ("fmnist-mlp-shallow", "Fashion-MNIST, 6-layer vanilla MLP width 256, plain SGD, 5 epochs",
     {**FMNIST, **MLP, "model_args": {"depth": 6, "width": 256}, "epochs": 5}),
    ("fmnist-vit", ("Fashion-MNIST 10k, paper ViT dim 128 x 6, AdamW lr 3e-3, RandAugment + "
                    "MixUp/CutMix, 10 epochs (CPU: ~10 min a run)"),
     {**FMNIST, **PAPER_VIT, **PAPER_AUG, "lr": 3e-3, "num_train": 10000, "epochs": 10,
      "model_args": {"dim": 128, "depth": 6, "heads": 4, "patch_size": 4}}),
]

# Issue 12, "soft BatchNorm": the demo MLP at depths 10 / 14 / 20, SIGReg on the plain net
# against the same net with BatchNorm, LayerNorm or residual connections and no regularizer.
# fmnist-mlp-d10-{none,strong,weak} equal fmnist-mlp-{none,strong,weak}; the family is named
# uniformly so every cell of docs/studies.md's table is one preset.
MLP_DEPTHS = (10, 14, 20)
MLP_PRIORS = {"bn": ("BatchNorm", {"norm": "batch"}), "ln": ("LayerNorm", {"norm": "layer"}),
              "res": ("residual connections", {"residual": True})}
MLP_INITS = {"he": "He (Kaiming-normal)", "orthogonal": "orthogonal"}  # model.init values
# Issue 12, the paper's collapse recipe on all of Fashion-MNIST: paper-vit at the paper's size
# (dim 256 x 6, 8 heads, patch 4 -> 7 x 7 tokens), AdamW lr 1e-3, cosine to 0, RandAugment(2, 9),
# MixUp/CutMix, the paper's SIGReg settings; 100 epochs (a GPU run: see experiments/gpu_vit_full.sh).
VIT_FULL = {**FMNIST, **PAPER_VIT, **PAPER_AUG, "epochs": 100}


def register(name: str, config: TrainConfig, description: str, paper: float | None = None) -> None:
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    PRESETS[name] = Preset(name, config, description, paper)


def _config(settings: dict, variant: str) -> TrainConfig:
    return TrainConfig(**{**settings, **PAPER_SIGREG, "sigreg": variant})


for stem, text, settings, reported in PAPER_ROWS:
    for variant, paper in zip(VARIANTS, reported, strict=True):
        register(f"{stem}-{variant}", _config({**CIFAR100, **settings}, variant),
                 f"{text}; SIGReg {variant}", paper)
for stem, text, settings in CPU_ROWS:
    for variant in VARIANTS:
        config = TrainConfig(**{**settings, **FMNIST_SIGREG, "sigreg": variant})
        register(f"{stem}-{variant}", config, f"{text}; SIGReg {variant}")
    # The baseline of docs/studies.md: VICReg's variance + covariance terms, same alpha.
    config = TrainConfig(**{**settings, **FMNIST_SIGREG, "sigreg": "vicreg", "sketch_dim": None})
    register(f"{stem}-vicreg", config, f"{text}; VICReg-style variance + covariance baseline")


for depth in MLP_DEPTHS:
    stem, text = f"fmnist-mlp-d{depth}", f"Fashion-MNIST, {depth}-layer MLP width 256, plain SGD, 5 epochs"
    settings = {**FMNIST, **MLP, **FMNIST_SIGREG, "epochs": 5}
    for variant in VARIANTS:
        register(f"{stem}-{variant}", TrainConfig(**{
            **settings, "model_args": {"depth": depth, "width": 256}, "sigreg": variant}),
            f"{text}, no normalisation; SIGReg {variant}")
    for arm, (prior, model_args) in MLP_PRIORS.items():
        register(f"{stem}-{arm}", TrainConfig(**{
            **settings, "model_args": {"depth": depth, "width": 256, **model_args},
            "sigreg": "none"}), f"{text}, with {prior}; no SIGReg")
    # Issue 18's initialisation control: the same nets with a variance-preserving init.
    for init, name in MLP_INITS.items():
        for variant in VARIANTS:
            register(f"{stem}-{init}-{variant}", TrainConfig(**{
                **settings, "model_args": {"depth": depth, "width": 256, "init": init},
                "sigreg": variant}), f"{text}, no normalisation, {name} init; SIGReg {variant}")
for variant in (*VARIANTS, "vicreg"):
    sketch = {"sketch_dim": None} if variant == "vicreg" else {}
    register(f"fmnist-vit-full-{variant}",
             TrainConfig(**{**VIT_FULL, **PAPER_SIGREG, **sketch, "sigreg": variant}),
             ("Fashion-MNIST 60k, paper ViT dim 256 x 6, AdamW lr 1e-3, RandAugment + "
              f"MixUp/CutMix, 100 epochs (the paper's recipe; GPU); SIGReg {variant}"))


# Issue 12's CPU-scale stability map (docs/studies.md, section 7b): fmnist-vit on 5000 training
# and 2000 test images for 8 epochs (~5 min a run on one CPU core); the map sets lr and seed.
for variant in (*VARIANTS, "vicreg"):
    base = PRESETS[f"fmnist-vit-{variant}"]
    register(f"fmnist-vit-5k-{variant}",
             dataclasses.replace(base.config, num_train=5000, num_test=2000, epochs=8),
             base.description.replace("Fashion-MNIST 10k", "Fashion-MNIST 5k (2k test)")
             .replace("10 epochs (CPU: ~10 min a run)", "8 epochs (CPU: ~5 min a run)"))


def get_preset(name: str) -> Preset:
    """The preset ``name``; ValueError listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str) -> TrainConfig:
    """A fresh, editable copy of a preset's config."""
    cfg = get_preset(name).config
    return dataclasses.replace(cfg, model_args=dict(cfg.model_args), preset=name)
