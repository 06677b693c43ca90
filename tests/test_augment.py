"""Tests for sigreg.train.augment: the on-device batch augmentation pipeline."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sigreg.train.augment import (
    OP_FUNCS,
    OPS,
    AugmentConfig,
    Batch,
    BatchAugmenter,
    augment_single_image,
    randaugment_magnitudes,
)

MEAN3, STD3 = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
PAPER = AugmentConfig(crop_padding=4, flip=True, randaugment_ops=2, randaugment_magnitude=9,
                      mixup_alpha=0.8, cutmix_alpha=1.0)
PLAIN = AugmentConfig(crop_padding=0, flip=False)


def images(b: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def normalised(x: torch.Tensor, mean=MEAN3, std=STD3) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s


def op(name: str, x: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Apply one RandAugment op to float [0, 255] images with the same magnitude for all."""
    return OP_FUNCS[name](x.float(), torch.full((x.shape[0],), float(magnitude)))


# ------------------------------------------------------------------ basics


@pytest.mark.parametrize("shape", [(16, 3, 32, 32), (16, 1, 28, 28), (5, 3, 20, 24)])
def test_shapes_and_dtypes_paper_recipe(shape):
    b, c, h, w = shape
    aug = BatchAugmenter(PAPER, MEAN3[:c], STD3[:c], seed=1)
    batch = aug(images(b, c, h, w), torch.arange(b))
    assert batch.images.shape == shape and batch.images.dtype == torch.float32
    assert batch.targets.dtype == torch.int64 and batch.targets_b is not None
    assert torch.isfinite(batch.images).all() and 0.0 <= batch.mix_weight <= 1.0
    assert aug.last_ops is not None and aug.last_ops.shape == (b, 2)


def test_eval_mode_is_exact_normalisation():
    x = images()
    aug = BatchAugmenter(PAPER, MEAN3, STD3)
    batch = aug(x, torch.arange(8), train=False)
    assert torch.equal(batch.images, normalised(x))
    assert batch.targets_b is None and batch.mix_weight == 1.0


def test_rejects_bad_input():
    aug = BatchAugmenter(PLAIN, MEAN3, STD3)
    with pytest.raises(TypeError):
        aug(images().float(), torch.arange(8))
    with pytest.raises(ValueError):
        aug(images(c=1), torch.arange(8))


# ------------------------------------------------------------ crop and flip


def test_flip_only_gives_original_or_mirror():
    x = images(64)
    out = BatchAugmenter(AugmentConfig(crop_padding=0, flip=True), MEAN3, STD3)(x, x[:, 0, 0, 0])
    ref, mirror = normalised(x), normalised(x.flip(-1))
    same = (out.images == ref).flatten(1).all(1)
    flipped = (out.images == mirror).flatten(1).all(1)
    assert (same | flipped).all()
    assert 10 < int(flipped.sum()) < 54  # p = 0.5


def test_crop_is_a_shift_within_padding_with_zero_fill():
    x = images(32).clamp_(min=1)  # nonzero content, so zeros can only come from the padding
    aug = BatchAugmenter(AugmentConfig(crop_padding=4, flip=False), (0.0,) * 3, (1.0,) * 3)
    out = (aug(x, torch.arange(32)).images * 255).round().to(torch.uint8)
    padded = F.pad(x, (4, 4, 4, 4))
    shifts = set()
    for i in range(32):
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 10


# ------------------------------------------------------------ RandAugment


def test_randaugment_chooses_ops_per_image():
    x = images(1).expand(64, -1, -1, -1).contiguous()  # 64 identical images
    cfg = AugmentConfig(crop_padding=0, flip=False, randaugment_ops=2)
    aug = BatchAugmenter(cfg, MEAN3, STD3, seed=3)
    out = aug(x, torch.zeros(64, dtype=torch.long)).images
    ops = aug.last_ops
    pairs = {tuple(p) for p in ops.tolist()}
    assert len(pairs) > 5
    assert len({tuple(o.flatten().tolist()) for o in out}) > 5  # outputs differ across batch
    ref = normalised(x[:1])[0]
    unsigned = {OPS.index(n) for n in ("Identity", "Posterize", "Solarize", "AutoContrast",
                                       "Equalize")}
    identity = OPS.index("Identity")
    for i, (a, b) in enumerate(ops.tolist()):
        if a == b == identity:
            assert torch.equal(out[i], ref)
        if a in unsigned and b in unsigned:  # no random sign: same pair -> same output
            j = next(j for j, p in enumerate(ops.tolist()) if p == [a, b])
            assert torch.equal(out[i], out[j])


def test_magnitude_table_matches_torchvision():
    mags = dict(zip(OPS, randaugment_magnitudes(9, 32, 32)))
    assert mags["ShearX"] == pytest.approx(0.09)
    assert mags["TranslateX"] == pytest.approx(150 / 331 * 32 * 0.3)
    assert mags["Rotate"] == pytest.approx(9.0)
    assert mags["Brightness"] == pytest.approx(0.27)
    assert mags["Posterize"] == 7
    assert mags["Solarize"] == pytest.approx(178.5)
    assert mags["Identity"] == mags["Equalize"] == mags["AutoContrast"] == 0
    with pytest.raises(ValueError):
        randaugment_magnitudes(31, 32, 32)


@pytest.mark.parametrize("name", ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY",
                                  "Rotate", "Brightness", "Color", "Contrast", "Sharpness"])
def test_zero_magnitude_is_identity(name):
    x = images(4).float()
    assert torch.equal(op(name, x, 0.0), x)


def test_geometric_ops():
    x = images(2, h=16, w=16).clamp(min=1).float()
    assert torch.equal(op("Rotate", x, 90.0), torch.rot90(x, 1, (2, 3)))  # counter-clockwise
    t = op("TranslateX", x, 3.7)  # torchvision truncates to int pixels
    assert torch.equal(t[..., 3:], x[..., :-3]) and (t[..., :3] == 0).all()
    t = op("TranslateY", x, -2.0)
    assert torch.equal(t[..., :-2, :], x[..., 2:, :]) and (t[..., -2:, :] == 0).all()
    s = op("ShearX", x, 0.3)  # about the top-left corner: top row fixed, bottom row shifted
    assert torch.equal(s[..., 0, :], x[..., 0, :])
    shift = round(0.3 * 15.5)
    assert torch.equal(s[..., -1, :-shift], x[..., -1, shift:])
    s = op("ShearY", x, 0.3)
    assert torch.equal(s[..., :, 0], x[..., :, 0])


def test_color_ops():
    x = images(4).float()
    assert (op("Brightness", x, -1.0) == 0).all()
    assert torch.equal(op("Brightness", x, 0.5), (1.5 * x).clamp(0, 255).floor())
    gray = op("Color", x, -1.0)  # factor 0 -> grayscale
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    x1 = images(4, c=1).float()
    assert torch.equal(op("Color", x1, 0.9), x1)  # no-op on grayscale
    flat = op("Contrast", x, -1.0)  # factor 0 -> the mean grey level everywhere
    assert (flat == flat[:, :1, :1, :1]).all()
    sharp = op("Sharpness", x, 0.9)
    # the border is kept, as in torchvision (up to its float rounding in the blend)
    assert (sharp[..., 0, :] - x[..., 0, :]).abs().max() <= 1
    assert not torch.equal(sharp, x)
    const = torch.full((1, 3, 8, 8), 77.0)
    assert torch.equal(op("Sharpness", const, 0.9), const)


def test_pixel_ops():
    x = images(4).float()
    assert torch.equal(op("Posterize", x, 4), (x.to(torch.uint8) & 0xF0).float())
    assert torch.equal(op("Solarize", x, 128), torch.where(x >= 128, 255 - x, x))
    assert torch.equal(op("Solarize", x, 255.5), x)
    low = (x / 4 + 50).floor()  # values in [50, 113]
    ac = op("AutoContrast", low, 0)
    assert (ac.amin(dim=(2, 3)) == 0).all() and (ac.amax(dim=(2, 3)) == 255).all()
    const = torch.full((1, 1, 8, 8), 9.0)
    assert torch.equal(op("AutoContrast", const, 0), const)
    assert torch.equal(op("Equalize", const, 0), const)
    eq = op("Equalize", low, 0)
    assert (eq.amax(dim=(2, 3)) >= 250).all() and eq.std() > 2 * low.std()
    # uniform-ish input stays roughly where it was (equalisation of a flat histogram)
    ramp = torch.arange(256.0).repeat(16).view(1, 1, 64, 64)
    assert (op("Equalize", ramp, 0) - ramp).abs().max() <= 1


# ------------------------------------------------------------ mixing


def _mix_only(**kw) -> BatchAugmenter:
    return BatchAugmenter(AugmentConfig(crop_padding=0, flip=False, **kw), MEAN3, STD3, seed=5)


def test_mixup_formula_and_loss():
    x, y = images(16), torch.arange(16)
    batch = _mix_only(mixup_alpha=0.8)(x, y)
    # labels are arange, so targets_b is the permutation
    perm, weight = batch.targets_b, batch.mix_weight
    ref = normalised(x)
    torch.testing.assert_close(batch.images, weight * ref + (1 - weight) * ref[perm])
    logits = torch.randn(16, 16)
    expected = weight * F.cross_entropy(logits, y) + (1 - weight) * F.cross_entropy(logits, perm)
    torch.testing.assert_close(batch.loss(logits), expected)


def test_cutmix_box_comes_from_permuted_images():
    b = 16
    x = torch.arange(b, dtype=torch.uint8).mul(10).view(b, 1, 1, 1).expand(b, 3, 32, 32)
    aug = _mix_only(cutmix_alpha=1.0)
    for _ in range(5):
        batch = aug(x.contiguous(), torch.arange(b))
        perm, ref = batch.targets_b, normalised(x)
        from_other = (batch.images != ref).any(1)  # (B, H, W): pixels taken from the partner
        moved = perm != torch.arange(b)
        box = from_other[moved.nonzero()[0, 0]]
        assert (from_other[moved] == box).all() and not from_other[~moved].any()
        area = int(box.sum())
        assert batch.mix_weight == pytest.approx(1 - area / (32 * 32))
        if area:  # the box is a rectangle filled from the permuted image
            rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
            assert area == len(rows) * len(cols)
            torch.testing.assert_close(batch.images[:, :, box], ref[perm][:, :, box])


def test_mix_mode_is_fifty_fifty_and_mix_prob():
    aug = _mix_only(mixup_alpha=0.8, cutmix_alpha=1.0)
    x, y = images(4, c=3, h=8, w=8), torch.arange(4)
    modes = []
    for _ in range(400):
        aug(x, y)
        modes.append(aug.last_mix)
    assert set(modes) == {"mixup", "cutmix"}
    assert 160 < modes.count("mixup") < 240
    aug = BatchAugmenter(AugmentConfig(mixup_alpha=0.8, mix_prob=0.0), MEAN3, STD3)
    batch = aug(x, y)
    assert batch.targets_b is None and batch.mix_weight == 1.0 and aug.last_mix == "none"


def test_correct_is_weighted_by_mix_weight():
    logits = torch.eye(4)  # predicts class i for sample i
    targets = torch.tensor([0, 1, 2, 0])
    assert Batch(torch.zeros(4), targets).correct(logits).item() == 3.0
    mixed = Batch(torch.zeros(4), targets, torch.tensor([3, 1, 0, 3]), mix_weight=0.7)
    assert mixed.correct(logits).item() == pytest.approx(0.7 * 3 + 0.3 * 2)
    assert Batch(torch.zeros(4), targets).loss(logits) == F.cross_entropy(logits, targets)


# ------------------------------------------------------------ reproducibility


def test_same_seed_same_output_and_seeds_differ():
    x, y = images(32), torch.arange(32)
    a = BatchAugmenter(PAPER, MEAN3, STD3, seed=11)(x, y)
    b = BatchAugmenter(PAPER, MEAN3, STD3, seed=11)(x, y)
    c = BatchAugmenter(PAPER, MEAN3, STD3, seed=12)(x, y)
    assert torch.equal(a.images, b.images) and a.mix_weight == b.mix_weight
    assert torch.equal(a.targets_b, b.targets_b)
    assert not torch.equal(a.images, c.images)


def test_state_dict_resumes_exactly():
    x, y = images(16), torch.arange(16)
    aug = BatchAugmenter(PAPER, MEAN3, STD3, seed=4)
    aug(x, y)
    state = aug.state_dict()
    expected = aug(x, y)
    resumed = BatchAugmenter(PAPER, MEAN3, STD3, seed=999)
    resumed.load_state_dict(state)
    got = resumed(x, y)
    assert torch.equal(got.images, expected.images) and got.mix_weight == expected.mix_weight


def test_explicit_generator_is_used():
    x, y = images(8), torch.arange(8)
    a = BatchAugmenter(PAPER, MEAN3, STD3, generator=torch.Generator().manual_seed(3))(x, y)
    b = BatchAugmenter(PAPER, MEAN3, STD3, seed=3)(x, y)
    assert torch.equal(a.images, b.images)


def test_single_image_helper():
    x = images(1, c=1, h=28, w=28)[0]
    plain = augment_single_image(x, PLAIN, (0.3,), (0.2,), torch.Generator())
    assert torch.equal(plain, normalised(x[None], (0.3,), (0.2,))[0])
    cfg = AugmentConfig(randaugment_ops=2)
    outs = [augment_single_image(x, cfg, (0.3,), (0.2,), torch.Generator().manual_seed(s))
            for s in (0, 0, 1)]
    assert outs[0].shape == (1, 28, 28) and outs[0].dtype == torch.float32
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert math.isfinite(outs[0].sum().item())
