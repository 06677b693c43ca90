"""Named training presets: one per row of the paper's tables, plus CPU-scale Fashion-MNIST ones.

A preset is a :class:`TrainConfig` and a line of text, each written out below as one
:func:`register` call: a family's shared settings are a dict written once (``FMNIST_MLP``), and
an entry adds what its runs differ in (the regularizer, its K, the model's sizes). A key may
not be given twice (Python refuses the call), so an entry's settings are exactly its family's
plus its own. Names read ``<model>-<optimizer>-<mix|nomix>-<none|weak|strong>``; the
Fashion-MNIST families also have ``-vicreg``: VICReg's variance + covariance terms, the
baseline of docs/studies.md. ``paper`` holds the top-1 the paper reports for that row on
CIFAR-100 (best epoch), for the report. ``sigreg presets --show NAME`` prints every setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ._words import did_you_mean
from .config import TrainConfig


@dataclass(frozen=True)
class Preset:
    name: str
    config: TrainConfig
    description: str
    paper: float | None = None  # reported CIFAR-100 top-1 (%), if this row is in the paper


PRESETS: dict[str, Preset] = {}


def register(name: str, *, description: str, paper: float | None = None,
             **settings: Any) -> None:
    """Add the preset ``name``: the :class:`TrainConfig` of ``settings`` (validated)."""
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    config = TrainConfig(**settings).validate()
    config.model_args = dict(config.model_args)  # not shared with the family's dict
    PRESETS[name] = Preset(name, config, description, paper)


# The names the experiments iterate over (experiments/soft_bn.py, init_control.py).
VARIANTS = ("none", "strong", "weak")
MLP_DEPTHS = (10, 14, 20)
MLP_PRIORS = ("bn", "ln", "res")  # fmnist-mlp-d<depth>-<prior>: BatchNorm, LayerNorm, residual


# --------------------------------------------------------------------------- CIFAR-100 (paper)
# One family per row of the paper's tables: CIFAR-100, batch 128, crop + flip, 400 epochs (1600
# for ResNet-18 without MixUp/CutMix). The paper's supervised code's SIGReg: K=64 directions,
# alpha=0.1, strong over [-5, 5] with 17 nodes (9 on [0, 5]: t_max=5, num_points=9), a fresh
# sketch every step. The paper ViT trains with AdamW lr 1e-3, weight decay 5e-4, cosine to 0, no
# clipping; the expert-tuned ("peak") ViT with weight decay 0.05, eta_min 1e-5, clipping at 1.
# Muon: muon_lr 1e-2 on the 2-D hidden weights, AdamW (0.9, 0.95) on the rest. "mix":
# RandAugment(2, 9) + MixUp 0.8 / CutMix 1.0 (the MLP and ResNet rows: MixUp/CutMix only).

PAPER_VIT_ADAMW_MIX = dict(dataset="cifar100", model="paper-vit", epochs=400, batch_size=128,
                           optimizer="adamw", lr=1e-3, weight_decay=5e-4, schedule="cosine",
                           eta_min=0.0, grad_clip=0.0, crop_padding=4, flip=True,
                           randaugment_ops=2, randaugment_magnitude=9, mixup_alpha=0.8,
                           cutmix_alpha=1.0, alpha=0.1, sketch_policy="resample",
                           t_max=5.0, num_points=9)
register("paper-vit-adamw-mix-none", **PAPER_VIT_ADAMW_MIX, sigreg="none", sketch_dim=64,
         paper=20.73,
         description="paper ViT, AdamW, RandAugment + MixUp/CutMix (the collapse); SIGReg none")
register("paper-vit-adamw-mix-strong", **PAPER_VIT_ADAMW_MIX, sigreg="strong", sketch_dim=64,
         paper=70.2,
         description="paper ViT, AdamW, RandAugment + MixUp/CutMix (the collapse); SIGReg strong")
register("paper-vit-adamw-mix-weak", **PAPER_VIT_ADAMW_MIX, sigreg="weak", sketch_dim=64,
         paper=72.02,
         description="paper ViT, AdamW, RandAugment + MixUp/CutMix (the collapse); SIGReg weak")

PAPER_VIT_MUON_NOMIX = dict(dataset="cifar100", model="paper-vit", epochs=400, batch_size=128,
                            optimizer="muon", lr=1e-3, weight_decay=5e-4, muon_lr=1e-2,
                            muon_adamw_betas=(0.9, 0.95), schedule="cosine", eta_min=0.0,
                            grad_clip=0.0, crop_padding=4, flip=True, randaugment_ops=2, alpha=0.1,
                            sketch_policy="resample", t_max=5.0, num_points=9)
register("paper-vit-muon-nomix-none", **PAPER_VIT_MUON_NOMIX, sigreg="none", sketch_dim=64,
         paper=58.77,
         description="paper ViT, Muon + AdamW, RandAugment, no MixUp/CutMix; SIGReg none")
register("paper-vit-muon-nomix-strong", **PAPER_VIT_MUON_NOMIX, sigreg="strong", sketch_dim=64,
         paper=63.16,
         description="paper ViT, Muon + AdamW, RandAugment, no MixUp/CutMix; SIGReg strong")
register("paper-vit-muon-nomix-weak", **PAPER_VIT_MUON_NOMIX, sigreg="weak", sketch_dim=64,
         paper=67.52,
         description="paper ViT, Muon + AdamW, RandAugment, no MixUp/CutMix; SIGReg weak")

PAPER_VIT_MUON_MIX = dict(dataset="cifar100", model="paper-vit", epochs=400, batch_size=128,
                          optimizer="muon", lr=1e-3, weight_decay=5e-4, muon_lr=1e-2,
                          muon_adamw_betas=(0.9, 0.95), schedule="cosine", eta_min=0.0,
                          grad_clip=0.0, crop_padding=4, flip=True, randaugment_ops=2,
                          randaugment_magnitude=9, mixup_alpha=0.8, cutmix_alpha=1.0, alpha=0.1,
                          sketch_policy="resample", t_max=5.0, num_points=9)
register("paper-vit-muon-mix-none", **PAPER_VIT_MUON_MIX, sigreg="none", sketch_dim=64,
         paper=62.44,
         description="paper ViT, Muon + AdamW, RandAugment + MixUp/CutMix; SIGReg none")
register("paper-vit-muon-mix-strong", **PAPER_VIT_MUON_MIX, sigreg="strong", sketch_dim=64,
         paper=74.34,
         description="paper ViT, Muon + AdamW, RandAugment + MixUp/CutMix; SIGReg strong")
register("paper-vit-muon-mix-weak", **PAPER_VIT_MUON_MIX, sigreg="weak", sketch_dim=64,
         paper=74.56,
         description="paper ViT, Muon + AdamW, RandAugment + MixUp/CutMix; SIGReg weak")

PEAK_VIT_ADAMW_MIX = dict(dataset="cifar100", model="peak-vit", epochs=400, batch_size=128,
                          optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine",
                          eta_min=1e-5, grad_clip=1.0, crop_padding=4, flip=True,
                          randaugment_ops=2, randaugment_magnitude=9, mixup_alpha=0.8,
                          cutmix_alpha=1.0, alpha=0.1, sketch_policy="resample",
                          t_max=5.0, num_points=9)
register("peak-vit-adamw-mix-none", **PEAK_VIT_ADAMW_MIX, sigreg="none", sketch_dim=64,
         paper=70.76,
         description="expert-tuned ViT, AdamW, RandAugment + MixUp/CutMix; SIGReg none")
register("peak-vit-adamw-mix-strong", **PEAK_VIT_ADAMW_MIX, sigreg="strong", sketch_dim=64,
         paper=72.71,
         description="expert-tuned ViT, AdamW, RandAugment + MixUp/CutMix; SIGReg strong")
register("peak-vit-adamw-mix-weak", **PEAK_VIT_ADAMW_MIX, sigreg="weak", sketch_dim=64,
         paper=71.65,
         description="expert-tuned ViT, AdamW, RandAugment + MixUp/CutMix; SIGReg weak")

PEAK_VIT_MUON_MIX = dict(dataset="cifar100", model="peak-vit", epochs=400, batch_size=128,
                         optimizer="muon", lr=1e-3, weight_decay=0.05, muon_lr=1e-2,
                         muon_adamw_betas=(0.9, 0.95), schedule="cosine", eta_min=1e-5,
                         grad_clip=1.0, crop_padding=4, flip=True, randaugment_ops=2,
                         randaugment_magnitude=9, mixup_alpha=0.8, cutmix_alpha=1.0, alpha=0.1,
                         sketch_policy="resample", t_max=5.0, num_points=9)
register("peak-vit-muon-mix-none", **PEAK_VIT_MUON_MIX, sigreg="none", sketch_dim=64, paper=75.87,
         description="expert-tuned ViT, Muon + AdamW, RandAugment + MixUp/CutMix; SIGReg none")
register("peak-vit-muon-mix-strong", **PEAK_VIT_MUON_MIX, sigreg="strong", sketch_dim=64,
         paper=76.98,
         description="expert-tuned ViT, Muon + AdamW, RandAugment + MixUp/CutMix; SIGReg strong")
register("peak-vit-muon-mix-weak", **PEAK_VIT_MUON_MIX, sigreg="weak", sketch_dim=64, paper=76.24,
         description="expert-tuned ViT, Muon + AdamW, RandAugment + MixUp/CutMix; SIGReg weak")

MLP_SGD_NOMIX = dict(dataset="cifar100", model="mlp", epochs=400, batch_size=128, optimizer="sgd",
                     lr=0.1, weight_decay=0.0, momentum=0.0, schedule="constant", grad_clip=1.0,
                     crop_padding=4, flip=True, alpha=0.1, sketch_policy="resample", t_max=5.0,
                     num_points=9)
register("mlp-sgd-nomix-none", **MLP_SGD_NOMIX, sigreg="none", sketch_dim=64, paper=26.77,
         description="vanilla 6-layer MLP, plain SGD, crop + flip; SIGReg none")
register("mlp-sgd-nomix-strong", **MLP_SGD_NOMIX, sigreg="strong", sketch_dim=64, paper=35.99,
         description="vanilla 6-layer MLP, plain SGD, crop + flip; SIGReg strong")
register("mlp-sgd-nomix-weak", **MLP_SGD_NOMIX, sigreg="weak", sketch_dim=64, paper=42.17,
         description="vanilla 6-layer MLP, plain SGD, crop + flip; SIGReg weak")

MLP_SGD_MIX = dict(dataset="cifar100", model="mlp", epochs=400, batch_size=128, optimizer="sgd",
                   lr=0.1, weight_decay=0.0, momentum=0.0, schedule="constant", grad_clip=1.0,
                   crop_padding=4, flip=True, mixup_alpha=0.8, cutmix_alpha=1.0, alpha=0.1,
                   sketch_policy="resample", t_max=5.0, num_points=9)
register("mlp-sgd-mix-none", **MLP_SGD_MIX, sigreg="none", sketch_dim=64, paper=38.08,
         description="vanilla 6-layer MLP, plain SGD, crop + flip + MixUp/CutMix; SIGReg none")
register("mlp-sgd-mix-strong", **MLP_SGD_MIX, sigreg="strong", sketch_dim=64, paper=38.7,
         description="vanilla 6-layer MLP, plain SGD, crop + flip + MixUp/CutMix; SIGReg strong")
register("mlp-sgd-mix-weak", **MLP_SGD_MIX, sigreg="weak", sketch_dim=64, paper=38.4,
         description="vanilla 6-layer MLP, plain SGD, crop + flip + MixUp/CutMix; SIGReg weak")

RESNET18_SGD_NOMIX = dict(dataset="cifar100", model="resnet18", epochs=1600, batch_size=128,
                          optimizer="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9,
                          schedule="cosine", crop_padding=4, flip=True, alpha=0.1,
                          sketch_policy="resample", t_max=5.0, num_points=9)
register("resnet18-sgd-nomix-none", **RESNET18_SGD_NOMIX, sigreg="none", sketch_dim=64,
         paper=79.03,
         description="ResNet-18, SGD momentum, 1600 epochs, crop + flip; SIGReg none")
register("resnet18-sgd-nomix-strong", **RESNET18_SGD_NOMIX, sigreg="strong", sketch_dim=64,
         paper=78.86,
         description="ResNet-18, SGD momentum, 1600 epochs, crop + flip; SIGReg strong")
register("resnet18-sgd-nomix-weak", **RESNET18_SGD_NOMIX, sigreg="weak", sketch_dim=64,
         paper=79.42,
         description="ResNet-18, SGD momentum, 1600 epochs, crop + flip; SIGReg weak")

RESNET18_SGD_MIX = dict(dataset="cifar100", model="resnet18", epochs=400, batch_size=128,
                        optimizer="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9,
                        schedule="cosine", crop_padding=4, flip=True, mixup_alpha=0.8,
                        cutmix_alpha=1.0, alpha=0.1, sketch_policy="resample",
                        t_max=5.0, num_points=9)
register("resnet18-sgd-mix-none", **RESNET18_SGD_MIX, sigreg="none", sketch_dim=64, paper=82.13,
         description=("ResNet-18, SGD momentum, 400 epochs, crop + flip + MixUp/CutMix; SIGReg "
                      "none"))
register("resnet18-sgd-mix-strong", **RESNET18_SGD_MIX, sigreg="strong", sketch_dim=64,
         paper=81.18,
         description=("ResNet-18, SGD momentum, 400 epochs, crop + flip + MixUp/CutMix; SIGReg "
                      "strong"))
register("resnet18-sgd-mix-weak", **RESNET18_SGD_MIX, sigreg="weak", sketch_dim=64, paper=82.13,
         description=("ResNet-18, SGD momentum, 400 epochs, crop + flip + MixUp/CutMix; SIGReg "
                      "weak"))


# --------------------------------------------------------------------------- Fashion-MNIST (CPU)
# CPU scale: Fashion-MNIST (Debian's dataset-fashion-mnist). Settings found by
# experiments/demo_search.py; see docs/cpu-scale-results.md. fmnist-mlp-* was the first demo.
FMNIST_MLP = dict(dataset="fashion-mnist", model="mlp", epochs=5, batch_size=128, optimizer="sgd",
                  lr=0.1, weight_decay=0.0, momentum=0.0, schedule="constant", grad_clip=1.0,
                  crop_padding=2, flip=True, alpha=0.1, sketch_policy="resample", t_max=3.0,
                  num_points=17, monitor_every=25)
register("fmnist-mlp-none", **FMNIST_MLP, model_args=dict(depth=10, width=256), sigreg="none",
         sketch_dim=64,
         description=("Fashion-MNIST, 10-layer vanilla MLP width 256, plain SGD, 5 epochs (the "
                      "demo); SIGReg none"))
register("fmnist-mlp-strong", **FMNIST_MLP, model_args=dict(depth=10, width=256), sigreg="strong",
         sketch_dim=64,
         description=("Fashion-MNIST, 10-layer vanilla MLP width 256, plain SGD, 5 epochs (the "
                      "demo); SIGReg strong"))
register("fmnist-mlp-weak", **FMNIST_MLP, model_args=dict(depth=10, width=256), sigreg="weak",
         sketch_dim=64,
         description=("Fashion-MNIST, 10-layer vanilla MLP width 256, plain SGD, 5 epochs (the "
                      "demo); SIGReg weak"))
register("fmnist-mlp-vicreg", **FMNIST_MLP, model_args=dict(depth=10, width=256), sigreg="vicreg",
         sketch_dim=None,
         description=("Fashion-MNIST, 10-layer vanilla MLP width 256, plain SGD, 5 epochs (the "
                      "demo); VICReg-style variance + covariance baseline"))
register("fmnist-mlp-shallow-none", **FMNIST_MLP, model_args=dict(depth=6, width=256),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 6-layer vanilla MLP width 256, plain SGD, 5 epochs; SIGReg "
                      "none"))
register("fmnist-mlp-shallow-strong", **FMNIST_MLP, model_args=dict(depth=6, width=256),
         sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST, 6-layer vanilla MLP width 256, plain SGD, 5 epochs; SIGReg "
                      "strong"))
register("fmnist-mlp-shallow-weak", **FMNIST_MLP, model_args=dict(depth=6, width=256),
         sigreg="weak", sketch_dim=64,
         description=("Fashion-MNIST, 6-layer vanilla MLP width 256, plain SGD, 5 epochs; SIGReg "
                      "weak"))
register("fmnist-mlp-shallow-vicreg", **FMNIST_MLP, model_args=dict(depth=6, width=256),
         sigreg="vicreg", sketch_dim=None,
         description=("Fashion-MNIST, 6-layer vanilla MLP width 256, plain SGD, 5 epochs; "
                      "VICReg-style variance + covariance baseline"))

# The ViT at CPU scale: 10k training images, dim 128 x 6, ~10 min a run on a CPU.
FMNIST_VIT = dict(dataset="fashion-mnist", num_train=10000, model="paper-vit",
                  model_args=dict(dim=128, depth=6, heads=4, patch_size=4), epochs=10,
                  batch_size=128, optimizer="adamw", lr=3e-3, weight_decay=5e-4,
                  schedule="cosine", eta_min=0.0, grad_clip=0.0, crop_padding=2, flip=True,
                  randaugment_ops=2, randaugment_magnitude=9, mixup_alpha=0.8, cutmix_alpha=1.0,
                  alpha=0.1, sketch_policy="resample", t_max=3.0, num_points=17, monitor_every=25)
register("fmnist-vit-none", **FMNIST_VIT, sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST 10k, paper ViT dim 128 x 6, AdamW lr 3e-3, RandAugment + "
                      "MixUp/CutMix, 10 epochs (CPU: ~10 min a run); SIGReg none"))
register("fmnist-vit-strong", **FMNIST_VIT, sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST 10k, paper ViT dim 128 x 6, AdamW lr 3e-3, RandAugment + "
                      "MixUp/CutMix, 10 epochs (CPU: ~10 min a run); SIGReg strong"))
register("fmnist-vit-weak", **FMNIST_VIT, sigreg="weak", sketch_dim=64,
         description=("Fashion-MNIST 10k, paper ViT dim 128 x 6, AdamW lr 3e-3, RandAugment + "
                      "MixUp/CutMix, 10 epochs (CPU: ~10 min a run); SIGReg weak"))
register("fmnist-vit-vicreg", **FMNIST_VIT, sigreg="vicreg", sketch_dim=None,
         description=("Fashion-MNIST 10k, paper ViT dim 128 x 6, AdamW lr 3e-3, RandAugment + "
                      "MixUp/CutMix, 10 epochs (CPU: ~10 min a run); VICReg-style variance + "
                      "covariance baseline"))

# "Soft BatchNorm" (docs/studies.md, section 5): the demo MLP at depths 10 / 14 / 20, SIGReg on the plain net
# against the same net with BatchNorm, LayerNorm or residual connections and no regularizer.
# fmnist-mlp-d10-{none,strong,weak} equal fmnist-mlp-{none,strong,weak}; the family is named
# uniformly so every cell of docs/studies.md's table is one preset. The initialisation control
# (section 11), -{he,orthogonal}-*: the plain nets with a variance-preserving init (model.init).
register("fmnist-mlp-d10-none", **FMNIST_MLP, model_args=dict(depth=10, width=256), sigreg="none",
         sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation; SIGReg none"))
register("fmnist-mlp-d10-strong", **FMNIST_MLP, model_args=dict(depth=10, width=256),
         sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation; SIGReg strong"))
register("fmnist-mlp-d10-weak", **FMNIST_MLP, model_args=dict(depth=10, width=256), sigreg="weak",
         sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation; SIGReg weak"))
register("fmnist-mlp-d10-bn", **FMNIST_MLP, model_args=dict(depth=10, width=256, norm="batch"),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, with BatchNorm;"
                      " no SIGReg"))
register("fmnist-mlp-d10-ln", **FMNIST_MLP, model_args=dict(depth=10, width=256, norm="layer"),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, with LayerNorm;"
                      " no SIGReg"))
register("fmnist-mlp-d10-res", **FMNIST_MLP, model_args=dict(depth=10, width=256, residual=True),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, with residual "
                      "connections; no SIGReg"))
register("fmnist-mlp-d10-he-none", **FMNIST_MLP, model_args=dict(depth=10, width=256, init="he"),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, He (Kaiming-normal) init; SIGReg none"))
register("fmnist-mlp-d10-he-strong", **FMNIST_MLP, model_args=dict(depth=10, width=256, init="he"),
         sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, He (Kaiming-normal) init; SIGReg strong"))
register("fmnist-mlp-d10-he-weak", **FMNIST_MLP, model_args=dict(depth=10, width=256, init="he"),
         sigreg="weak", sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, He (Kaiming-normal) init; SIGReg weak"))
register("fmnist-mlp-d10-orthogonal-none", **FMNIST_MLP,
         model_args=dict(depth=10, width=256, init="orthogonal"), sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, orthogonal init; SIGReg none"))
register("fmnist-mlp-d10-orthogonal-strong", **FMNIST_MLP,
         model_args=dict(depth=10, width=256, init="orthogonal"), sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, orthogonal init; SIGReg strong"))
register("fmnist-mlp-d10-orthogonal-weak", **FMNIST_MLP,
         model_args=dict(depth=10, width=256, init="orthogonal"), sigreg="weak", sketch_dim=64,
         description=("Fashion-MNIST, 10-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, orthogonal init; SIGReg weak"))

register("fmnist-mlp-d14-none", **FMNIST_MLP, model_args=dict(depth=14, width=256), sigreg="none",
         sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation; SIGReg none"))
register("fmnist-mlp-d14-strong", **FMNIST_MLP, model_args=dict(depth=14, width=256),
         sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation; SIGReg strong"))
register("fmnist-mlp-d14-weak", **FMNIST_MLP, model_args=dict(depth=14, width=256), sigreg="weak",
         sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation; SIGReg weak"))
register("fmnist-mlp-d14-bn", **FMNIST_MLP, model_args=dict(depth=14, width=256, norm="batch"),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, with BatchNorm;"
                      " no SIGReg"))
register("fmnist-mlp-d14-ln", **FMNIST_MLP, model_args=dict(depth=14, width=256, norm="layer"),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, with LayerNorm;"
                      " no SIGReg"))
register("fmnist-mlp-d14-res", **FMNIST_MLP, model_args=dict(depth=14, width=256, residual=True),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, with residual "
                      "connections; no SIGReg"))
register("fmnist-mlp-d14-he-none", **FMNIST_MLP, model_args=dict(depth=14, width=256, init="he"),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, He (Kaiming-normal) init; SIGReg none"))
register("fmnist-mlp-d14-he-strong", **FMNIST_MLP, model_args=dict(depth=14, width=256, init="he"),
         sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, He (Kaiming-normal) init; SIGReg strong"))
register("fmnist-mlp-d14-he-weak", **FMNIST_MLP, model_args=dict(depth=14, width=256, init="he"),
         sigreg="weak", sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, He (Kaiming-normal) init; SIGReg weak"))
register("fmnist-mlp-d14-orthogonal-none", **FMNIST_MLP,
         model_args=dict(depth=14, width=256, init="orthogonal"), sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, orthogonal init; SIGReg none"))
register("fmnist-mlp-d14-orthogonal-strong", **FMNIST_MLP,
         model_args=dict(depth=14, width=256, init="orthogonal"), sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, orthogonal init; SIGReg strong"))
register("fmnist-mlp-d14-orthogonal-weak", **FMNIST_MLP,
         model_args=dict(depth=14, width=256, init="orthogonal"), sigreg="weak", sketch_dim=64,
         description=("Fashion-MNIST, 14-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, orthogonal init; SIGReg weak"))

register("fmnist-mlp-d20-none", **FMNIST_MLP, model_args=dict(depth=20, width=256), sigreg="none",
         sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation; SIGReg none"))
register("fmnist-mlp-d20-strong", **FMNIST_MLP, model_args=dict(depth=20, width=256),
         sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation; SIGReg strong"))
register("fmnist-mlp-d20-weak", **FMNIST_MLP, model_args=dict(depth=20, width=256), sigreg="weak",
         sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation; SIGReg weak"))
register("fmnist-mlp-d20-bn", **FMNIST_MLP, model_args=dict(depth=20, width=256, norm="batch"),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, with BatchNorm;"
                      " no SIGReg"))
register("fmnist-mlp-d20-ln", **FMNIST_MLP, model_args=dict(depth=20, width=256, norm="layer"),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, with LayerNorm;"
                      " no SIGReg"))
register("fmnist-mlp-d20-res", **FMNIST_MLP, model_args=dict(depth=20, width=256, residual=True),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, with residual "
                      "connections; no SIGReg"))
register("fmnist-mlp-d20-he-none", **FMNIST_MLP, model_args=dict(depth=20, width=256, init="he"),
         sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, He (Kaiming-normal) init; SIGReg none"))
register("fmnist-mlp-d20-he-strong", **FMNIST_MLP, model_args=dict(depth=20, width=256, init="he"),
         sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, He (Kaiming-normal) init; SIGReg strong"))
register("fmnist-mlp-d20-he-weak", **FMNIST_MLP, model_args=dict(depth=20, width=256, init="he"),
         sigreg="weak", sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, He (Kaiming-normal) init; SIGReg weak"))
register("fmnist-mlp-d20-orthogonal-none", **FMNIST_MLP,
         model_args=dict(depth=20, width=256, init="orthogonal"), sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, orthogonal init; SIGReg none"))
register("fmnist-mlp-d20-orthogonal-strong", **FMNIST_MLP,
         model_args=dict(depth=20, width=256, init="orthogonal"), sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, orthogonal init; SIGReg strong"))
register("fmnist-mlp-d20-orthogonal-weak", **FMNIST_MLP,
         model_args=dict(depth=20, width=256, init="orthogonal"), sigreg="weak", sketch_dim=64,
         description=("Fashion-MNIST, 20-layer MLP width 256, plain SGD, 5 epochs, no "
                      "normalisation, orthogonal init; SIGReg weak"))

# The paper's collapse recipe on all of Fashion-MNIST: paper-vit at the paper's size
# (dim 256 x 6, 8 heads, patch 4 -> 7 x 7 tokens), AdamW lr 1e-3, cosine to 0, RandAugment(2, 9),
# MixUp/CutMix, the paper's SIGReg settings; 100 epochs (a GPU run: see experiments/gpu_vit_full.sh).
FMNIST_VIT_FULL = dict(dataset="fashion-mnist", model="paper-vit", epochs=100, batch_size=128,
                       optimizer="adamw", lr=1e-3, weight_decay=5e-4, schedule="cosine",
                       eta_min=0.0, grad_clip=0.0, crop_padding=2, flip=True, randaugment_ops=2,
                       randaugment_magnitude=9, mixup_alpha=0.8, cutmix_alpha=1.0, alpha=0.1,
                       sketch_policy="resample", t_max=5.0, num_points=9, monitor_every=25)
register("fmnist-vit-full-none", **FMNIST_VIT_FULL, sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST 60k, paper ViT dim 256 x 6, AdamW lr 1e-3, RandAugment + "
                      "MixUp/CutMix, 100 epochs (the paper's recipe; GPU); SIGReg none"))
register("fmnist-vit-full-strong", **FMNIST_VIT_FULL, sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST 60k, paper ViT dim 256 x 6, AdamW lr 1e-3, RandAugment + "
                      "MixUp/CutMix, 100 epochs (the paper's recipe; GPU); SIGReg strong"))
register("fmnist-vit-full-weak", **FMNIST_VIT_FULL, sigreg="weak", sketch_dim=64,
         description=("Fashion-MNIST 60k, paper ViT dim 256 x 6, AdamW lr 1e-3, RandAugment + "
                      "MixUp/CutMix, 100 epochs (the paper's recipe; GPU); SIGReg weak"))
register("fmnist-vit-full-vicreg", **FMNIST_VIT_FULL, sigreg="vicreg", sketch_dim=None,
         description=("Fashion-MNIST 60k, paper ViT dim 256 x 6, AdamW lr 1e-3, RandAugment + "
                      "MixUp/CutMix, 100 epochs (the paper's recipe; GPU); SIGReg vicreg"))

# The CPU-scale stability map (docs/studies.md, section 7b): fmnist-vit on 5000 training
# and 2000 test images for 8 epochs (~5 min a run on one CPU core); the map sets lr and seed.
FMNIST_VIT_5K = dict(dataset="fashion-mnist", num_train=5000, num_test=2000, model="paper-vit",
                     model_args=dict(dim=128, depth=6, heads=4, patch_size=4), epochs=8,
                     batch_size=128, optimizer="adamw", lr=3e-3, weight_decay=5e-4,
                     schedule="cosine", eta_min=0.0, grad_clip=0.0, crop_padding=2, flip=True,
                     randaugment_ops=2, randaugment_magnitude=9, mixup_alpha=0.8, cutmix_alpha=1.0,
                     alpha=0.1, sketch_policy="resample",
                     t_max=3.0, num_points=17, monitor_every=25)
register("fmnist-vit-5k-none", **FMNIST_VIT_5K, sigreg="none", sketch_dim=64,
         description=("Fashion-MNIST 5k (2k test), paper ViT dim 128 x 6, AdamW lr 3e-3, "
                      "RandAugment + MixUp/CutMix, 8 epochs (CPU: ~5 min a run); SIGReg none"))
register("fmnist-vit-5k-strong", **FMNIST_VIT_5K, sigreg="strong", sketch_dim=64,
         description=("Fashion-MNIST 5k (2k test), paper ViT dim 128 x 6, AdamW lr 3e-3, "
                      "RandAugment + MixUp/CutMix, 8 epochs (CPU: ~5 min a run); SIGReg strong"))
register("fmnist-vit-5k-weak", **FMNIST_VIT_5K, sigreg="weak", sketch_dim=64,
         description=("Fashion-MNIST 5k (2k test), paper ViT dim 128 x 6, AdamW lr 3e-3, "
                      "RandAugment + MixUp/CutMix, 8 epochs (CPU: ~5 min a run); SIGReg weak"))
register("fmnist-vit-5k-vicreg", **FMNIST_VIT_5K, sigreg="vicreg", sketch_dim=None,
         description=("Fashion-MNIST 5k (2k test), paper ViT dim 128 x 6, AdamW lr 3e-3, "
                      "RandAugment + MixUp/CutMix, 8 epochs (CPU: ~5 min a run); VICReg-style "
                      "variance + covariance baseline"))


def get_preset(name: str) -> Preset:
    """The preset ``name``; ValueError naming the closest and listing the valid names
    otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; valid "
                         f"presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str) -> TrainConfig:
    """A fresh, editable copy of a preset's config."""
    cfg = get_preset(name).config
    return dataclasses.replace(cfg, model_args=dict(cfg.model_args), preset=name)
