"""Issue 12's preset families: the soft-BatchNorm MLPs and the full Fashion-MNIST ViT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sigreg.train.models import build_model
from sigreg.train.presets import MLP_DEPTHS, MLP_PRIORS, PRESETS, VARIANTS, preset_config


def _settings(name: str) -> dict:
    return {k: v for k, v in preset_config(name).to_dict().items() if k != "preset"}


@pytest.mark.parametrize("variant", ["none", "strong", "weak"])
def test_depth10_family_is_the_demo(variant):
    assert _settings(f"fmnist-mlp-d10-{variant}") == _settings(f"fmnist-mlp-{variant}")


@pytest.mark.parametrize("depth", [10, 14, 20])
@pytest.mark.parametrize(("arm", "kind"), [("bn", nn.BatchNorm1d), ("ln", nn.LayerNorm),
                                           ("res", None), ("none", None)])
def test_prior_arms_differ_from_the_plain_net_only_in_the_model(depth, arm, kind):
    cfg = preset_config(f"fmnist-mlp-d{depth}-{arm}")
    plain = _settings(f"fmnist-mlp-d{depth}-none")
    assert {k: v for k, v in _settings(cfg.preset).items() if k != "model_args"} == \
        {k: v for k, v in plain.items() if k != "model_args"}
    assert cfg.sigreg == "none"
    model = build_model(cfg.model, num_classes=10, image_size=28, in_channels=1, **cfg.model_args)
    assert len(model.layers) == depth - 1
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm))]
    assert len(norms) == (depth - 1 if kind else 0)
    assert all(isinstance(m, kind) for m in norms)
    assert model.residual == (arm == "res")


@pytest.mark.parametrize("variant", ["none", "strong", "weak", "vicreg"])
def test_vit_full_is_the_papers_recipe_on_all_of_fashion_mnist(variant):
    cfg = preset_config(f"fmnist-vit-full-{variant}")
    paper = preset_config(f"paper-vit-adamw-mix-{'none' if variant == 'vicreg' else variant}")
    assert cfg.dataset == "fashion-mnist" and cfg.num_train is None and cfg.model_args == {}
    same = ("model", "optimizer", "lr", "weight_decay", "schedule", "eta_min", "grad_clip",
            "randaugment_ops", "randaugment_magnitude", "mixup_alpha", "cutmix_alpha",
            "batch_size", "alpha", "t_max", "num_points", "sketch_policy")
    assert {k: getattr(cfg, k) for k in same} == {k: getattr(paper, k) for k in same}
    assert cfg.sigreg == variant and cfg.epochs == 100
    assert cfg.sketch_dim == (None if variant == "vicreg" else 64)


def test_every_new_preset_builds_a_model_that_backpropagates():
    names = [n for n in PRESETS if n.startswith(("fmnist-mlp-d", "fmnist-vit-full-"))]
    assert len(names) == 3 * (6 + 2 * 3) + 4  # per depth: 3 variants, 3 priors, 2 inits x 3
    for name in names:
        cfg = preset_config(name)
        args = {**cfg.model_args, "depth": 3} if cfg.model == "mlp" else {"dim": 32, "depth": 1,
                                                                         "heads": 2}
        model = build_model(cfg.model, num_classes=10, image_size=28, in_channels=1, **args)
        model(torch.randn(4, 1, 28, 28)).logsumexp(1).sum().backward()


def test_vit_5k_presets_are_the_stability_map_settings():
    """docs/studies.md section 7b ran fmnist-vit-<arm> with these --set items; the 5k presets
    must be exactly that, so one preset reruns a cell."""
    from sigreg.train.config import apply_overrides

    for arm in ("none", "weak", "strong", "vicreg"):
        ran = apply_overrides(preset_config(f"fmnist-vit-{arm}"),
                              ["num_train=5000", "num_test=2000", "epochs=8"]).to_dict()
        preset = preset_config(f"fmnist-vit-5k-{arm}").to_dict()
        assert {k: v for k, v in ran.items() if k != "preset"} == \
            {k: v for k, v in preset.items() if k != "preset"}


def test_the_experiments_names_are_presets():
    for depth in MLP_DEPTHS:
        for arm in (*VARIANTS, *MLP_PRIORS):
            assert f"fmnist-mlp-d{depth}-{arm}" in PRESETS
        for init in ("he", "orthogonal"):
            for variant in VARIANTS:
                assert f"fmnist-mlp-d{depth}-{init}-{variant}" in PRESETS
