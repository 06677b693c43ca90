"""Tests for the model registry (sigreg.train.models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sigreg.train.models import MODELS, build_model, model_names, register_model
from sigreg.train.models.vit import ViT, apply_rotary, rope_2d_angles

# Small sizes keep every test fast on 2 CPU cores.
SMALL: dict[str, dict] = {
    "paper-vit": {"dim": 32, "depth": 2, "heads": 2},
    "peak-vit": {"dim": 24, "depth": 2, "heads": 2},
    "mlp": {"depth": 3, "width": 16},
    "resnet18": {"width": 4},
}


def small(name: str, *, image_size: int = 32, in_channels: int = 3, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        name, num_classes=10, image_size=image_size, in_channels=in_channels,
        **{**SMALL[name], **kw},
    )  # fmt: skip


@pytest.fixture(scope="module")
def paper_vit_cifar() -> nn.Module:
    """paper-vit at the paper's defaults for CIFAR-10 (built once: init dominates test time)."""
    torch.manual_seed(0)
    return build_model("paper-vit", num_classes=10, image_size=32, in_channels=3)


def test_registry_lists_the_paper_models():
    assert model_names() == ["mlp", "paper-vit", "peak-vit", "resnet18"]
    assert set(MODELS) == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("image_size", [28, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_gives_logits(name, image_size, in_channels):
    model = small(name, image_size=image_size, in_channels=in_channels)
    out = model(torch.randn(3, in_channels, image_size, image_size))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    out.sum().backward()  # every parameter is used
    assert all(p.grad is not None for p in model.parameters())


# Expected sigreg output rank per model: (B, T, C), (B, C), or (B, C, H, W).
SIGREG_NDIM = {"paper-vit": 3, "peak-vit": 3, "mlp": 2, "resnet18": 4}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_sigreg_layers_exist_and_have_documented_shapes(name):
    model = small(name, image_size=28, in_channels=1)
    assert model.sigreg_pool == "mean"
    modules = dict(model.named_modules())
    assert model.sigreg_layers and all(n in modules for n in model.sigreg_layers)
    shapes: dict[str, torch.Size] = {}
    for n in model.sigreg_layers:
        modules[n].register_forward_hook(lambda m, a, out, n=n: shapes.__setitem__(n, out.shape))
    model(torch.randn(2, 1, 28, 28))
    assert set(shapes) == set(model.sigreg_layers)
    for shape in shapes.values():
        assert len(shape) == SIGREG_NDIM[name] and shape[0] == 2
    if name == "paper-vit":  # 7x7 patch tokens, no CLS
        assert all(s == (2, 49, 32) for s in shapes.values())
    if name == "peak-vit":  # CLS + 7x7 patch tokens
        assert all(s == (2, 50, 24) for s in shapes.values())


def test_sigreg_layer_names(paper_vit_cifar):
    assert small("paper-vit", depth=3).sigreg_layers == ["blocks.0", "blocks.1", "blocks.2"]
    assert paper_vit_cifar.sigreg_layers == [f"blocks.{i}" for i in range(6)]
    expected = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert small("resnet18").sigreg_layers == expected


def test_paper_vit_default_parameter_count(paper_vit_cifar):
    # Computed from the architecture description, not from the model.
    c, p, d, depth, hidden, classes = 3, 4, 256, 6, 2 * 256, 10
    patch = (c * p * p) * d + d
    ln = 2 * d
    attn = d * 3 * d + (d * d + d)  # qkv without bias, output projection with bias
    mlp = (d * hidden + hidden) + (hidden * d + d)
    block = ln + attn + ln + mlp
    head = ln + d * classes + classes  # final LayerNorm + Linear
    expected = patch + depth * block + head
    assert expected == 3_173_642

    model = paper_vit_cifar
    assert sum(q.numel() for q in model.parameters()) == expected
    # No absolute position embedding or CLS token, no qkv bias.
    names = [n for n, _ in model.named_parameters()]
    assert not any("pos" in n or "cls" in n or n.endswith("qkv.bias") for n in names)


def test_paper_vit_init(paper_vit_cifar):
    model = paper_vit_cifar
    w = model.blocks[0].mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.004 and w.abs().max() <= 0.04 + 1e-6
    assert (model.blocks[0].mlp[0].bias == 0).all() and (model.head.bias == 0).all()
    assert (model.norm.weight == 1).all() and (model.norm.bias == 0).all()


# --------------------------------------------------------------------------- RoPE
def _score(q, k, pq, pk, head_dim=16):
    """<rope(q, pq), rope(k, pk)> for single vectors at (row, col) positions pq, pk."""
    rows = torch.tensor([pq[0], pk[0]], dtype=torch.float64)
    cols = torch.tensor([pq[1], pk[1]], dtype=torch.float64)
    angles = rope_2d_angles(rows, cols, head_dim).double()
    rq = apply_rotary(q[None], angles[:1])[0]
    rk = apply_rotary(k[None], angles[1:])[0]
    return (rq * rk).sum()


@pytest.mark.parametrize("shift", [(3, 0), (0, 5), (2, -4)])
def test_rope_scores_depend_only_on_relative_position(shift):
    torch.manual_seed(0)
    q, k = torch.randn(2, 16, dtype=torch.float64)
    pq, pk = (1, 2), (4, 0)
    moved = [(r + shift[0], c + shift[1]) for r, c in (pq, pk)]
    assert torch.allclose(_score(q, k, pq, pk), _score(q, k, *moved), atol=1e-10)


def test_rope_scores_change_with_row_and_column_offset():
    torch.manual_seed(0)
    q, k = torch.randn(2, 16, dtype=torch.float64)
    base = _score(q, k, (0, 0), (0, 0))
    assert not torch.allclose(base, _score(q, k, (0, 0), (1, 0)))  # row offset matters
    assert not torch.allclose(base, _score(q, k, (0, 0), (0, 1)))  # column offset matters
    # Rotations preserve norms, and position (0, 0) is no rotation at all.
    assert torch.allclose(base, q @ k)


def test_apply_rotary_rotates_channel_pairs():
    x, angles = torch.randn(2, 3, 5, 8), torch.rand(5, 4) * 10
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    expected = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    assert torch.allclose(apply_rotary(x, angles), expected, atol=1e-5)


def test_rope_first_half_follows_rows_second_half_columns():
    angles = rope_2d_angles(torch.tensor([2.0]), torch.tensor([0.0]), head_dim=16)
    assert (angles[0, :4] != 0).all() and (angles[0, 4:] == 0).all()
    # Standard frequencies: base ** (-2i / (head_dim / 2)), i.e. 1, 0.1, 0.01, 0.001 here.
    assert torch.allclose(angles[0, :4], 2 * torch.tensor([1.0, 0.1, 0.01, 0.001]))


def _permute_patches(x: torch.Tensor, p: int, perm: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    t = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c, p, p)
    t = t[:, perm].reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(b, c, h, w)


def _sharp_vit(rope: bool) -> ViT:
    """Small paper-style ViT whose attention is far from uniform (init is near-uniform)."""
    torch.manual_seed(0)
    model = ViT(
        num_classes=10, image_size=16, in_channels=3, patch_size=4, dim=32, depth=2, heads=2,
        mlp_ratio=2.0, rope=rope,
    )  # fmt: skip
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(20)
    return model.eval()


def test_paper_vit_is_not_permutation_invariant_over_patches():
    x = torch.randn(2, 3, 16, 16)
    shuffled = _permute_patches(
        x, 4, torch.randperm(16, generator=torch.Generator().manual_seed(0))
    )
    with torch.no_grad():
        model = small("paper-vit", image_size=16).eval()  # the registered model, as initialized
        assert (model(x) - model(shuffled)).abs().max() > 1e-7
        rope = _sharp_vit(rope=True)
        assert (rope(x) - rope(shuffled)).abs().max() > 1e-2
        # Control: the same weights without RoPE carry no position information -> invariant.
        plain = _sharp_vit(rope=False)
        assert torch.allclose(plain(x), plain(shuffled), atol=1e-5)


# --------------------------------------------------------------------------- peak-vit
def test_peak_vit_drop_path_train_vs_eval():
    model = small("peak-vit", depth=4, drop_path_rate=0.5)
    rates = [b.drop_path.p for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    x = torch.randn(8, 3, 32, 32)

    model.eval()
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(ref, model(x))  # eval is deterministic
        model.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, ref)


def test_peak_vit_defaults():
    model = build_model("peak-vit", num_classes=10, image_size=32, in_channels=3)
    assert model.cls_token is not None and model.pos_embed.shape == (1, 65, 192)
    assert model.blocks[0].attn.qkv.bias is not None and len(model.blocks) == 9
    assert model.blocks[-1].drop_path.p == pytest.approx(0.1)


def test_paper_vit_train_equals_eval():
    # No dropout or drop path anywhere: training mode changes nothing.
    model = small("paper-vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.train()(x), model.eval()(x))


# --------------------------------------------------------------------------- mlp / resnet
def test_mlp_structure():
    model = build_model("mlp", num_classes=10, image_size=28, in_channels=1)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6
    assert model.sigreg_layers == [f"layers.{i}" for i in range(5)]
    assert "head" in linears and "head" not in model.sigreg_layers
    assert model.layers[0].in_features == 784 and model.layers[-1].out_features == 1024
    assert not any(
        isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.Dropout)) for m in model.modules()
    )


def test_mlp_sigreg_outputs_are_pre_activations():
    model = small("mlp")
    seen = []
    model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out))
    model(torch.randn(4, 3, 32, 32))
    assert (seen[0] < 0).any()  # ReLU has not been applied yet


@pytest.mark.parametrize("image_size", [28, 32])
def test_resnet18_default_forward(image_size):
    model = build_model("resnet18", num_classes=10, image_size=image_size, in_channels=3)
    assert isinstance(model.stem[0], nn.Conv2d) and model.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.layer4[1].conv2.out_channels == 512
    with torch.no_grad():
        assert model(torch.randn(2, 3, image_size, image_size)).shape == (2, 10)


# --------------------------------------------------------------------------- errors
def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: mlp, paper-vit, peak-vit, resnet18"):
        build_model("vit-huge", num_classes=10, image_size=32, in_channels=3)


def test_unknown_override_lists_valid_ones():
    with pytest.raises(ValueError, match="widht.*valid overrides: .*width"):
        build_model("mlp", num_classes=10, image_size=28, in_channels=1, widht=10)
    with pytest.raises(ValueError, match="dropout.*patch_size, dim, depth, heads"):
        build_model("paper-vit", num_classes=10, image_size=32, in_channels=3, dropout=0.1)


@pytest.mark.parametrize("name", ["paper-vit", "peak-vit"])
def test_vit_image_size_must_divide_by_patch(name):
    with pytest.raises(ValueError, match=r"image_size \(28\).*divisible by patch_size \(8\)"):
        build_model(name, num_classes=10, image_size=28, in_channels=1, patch_size=8)
    # 28 with patch 7 gives a 4x4 grid.
    model = small(name, image_size=28, in_channels=1, patch_size=7)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_vit_rejects_wrong_input_size():
    with pytest.raises(ValueError, match="expected 32x32"):
        small("paper-vit")(torch.randn(1, 3, 28, 28))


def test_bad_sizes_raise_value_error():
    with pytest.raises(ValueError, match="heads"):
        small("paper-vit", dim=30, heads=4)
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        small("paper-vit", dim=24, heads=4)
    with pytest.raises(ValueError, match="depth"):
        small("mlp", depth=1)
    with pytest.raises(ValueError, match="image_size"):
        build_model("resnet18", num_classes=10, image_size=0, in_channels=3)


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(MODELS["mlp"])


@pytest.mark.parametrize(("norm", "kind"), [("batch", nn.BatchNorm1d), ("layer", nn.LayerNorm)])
def test_mlp_norm_sits_between_linear_and_relu_and_is_hooked(norm, kind):
    model = small("mlp", norm=norm)
    assert model.sigreg_layers == ["norms.0", "norms.1"]
    assert all(isinstance(m, kind) for m in model.norms)
    seen = []
    model.norms[1].register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    x = torch.randn(8, 3, 32, 32)
    model(x)
    linear_out, normed = seen[0]
    expected = model.layers[1](torch.relu(model.norms[0](model.layers[0](x.flatten(1)))))
    assert torch.allclose(linear_out, expected, atol=1e-6)  # norm follows its Linear
    assert (normed < 0).any()  # hooked before the ReLU
    if norm == "batch":  # per channel over the batch: mean 0, variance 1 in training mode
        assert torch.allclose(normed.mean(0), torch.zeros(16), atol=1e-5)


def test_mlp_residual_adds_block_input_after_the_first_layer():
    model = small("mlp", depth=4, residual=True)
    x = torch.randn(5, 3, 32, 32)
    h = torch.relu(model.layers[0](x.flatten(1)))
    for layer in model.layers[1:]:
        h = h + torch.relu(layer(h))
    assert torch.allclose(model(x), model.head(h), atol=1e-6)
    plain = small("mlp", depth=4)  # same seed, same weights, no skip: a different function
    assert not torch.allclose(plain(x), model(x))


def test_mlp_defaults_keep_their_state_dict_keys():
    keys = set(small("mlp").state_dict())
    assert keys == {f"{k}.{p}" for k in ("layers.0", "layers.1", "head") for p in ("weight", "bias")}
    assert set(small("mlp", norm=None).state_dict()) == keys  # --set model.norm=none parses to None


def test_mlp_rejects_unknown_norm_and_non_bool_residual():
    with pytest.raises(ValueError, match="norm must be one of none, batch, layer; got 'group'"):
        small("mlp", norm="group")
    with pytest.raises(ValueError, match="residual must be true or false"):
        small("mlp", residual="yes")
