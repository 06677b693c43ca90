"""On-device batch augmentation reproducing the paper's CIFAR recipe.

Pipeline (train mode), applied to a uint8 batch already on the training device:
random crop with zero padding -> horizontal flip -> RandAugment (per-image op choice,
torchvision semantics) -> normalise -> per batch MixUp or CutMix.

Everything is vectorised over the batch. RandAugment samples its ops *per image*
(as torchvision does when it runs per sample in a DataLoader), unlike kornia 0.9's
``RandAugment`` which draws one op sequence per call: we sort the batch by chosen op
and run each op once on the contiguous slice of samples that picked it. The 14 ops and their
magnitude table reproduce torchvision's tensor implementations (nearest interpolation, fill 0);
checked bit for bit against torchvision 0.26 on random uint8 images, without depending on it.

Randomness: all of it comes from one seeded ``torch.Generator``, CPU by default.
A CPU generator is the reproducible *and* fast choice here: the random tensors are tiny
(a few numbers per image), the routing of samples to ops needs host-side counts anyway
(a CUDA generator would force a device sync per op slot), and a CPU stream gives the same
draws whatever device the images live on, so runs are comparable across CPU and GPU.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
OpFn = Callable[[Tensor, Tensor], Tensor]

# torchvision's RandAugment op list, in its order.
OPS: tuple[str, ...] = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    "Brightness", "Color", "Contrast", "Sharpness",
    "Posterize", "Solarize", "AutoContrast", "Equalize",
)
# Ops whose magnitude gets a random sign.
SIGNED: frozenset[str] = frozenset(OPS[1:10])
NUM_BINS = 31


def randaugment_magnitudes(
    magnitude: int, height: int, width: int, num_bins: int = NUM_BINS
) -> list[float]:
    """Unsigned magnitude of each op in ``OPS`` at bin ``magnitude`` (torchvision's ranges)."""
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"magnitude must be in [0, {num_bins - 1}], got {magnitude}")

    def bin_of(lo: float, hi: float) -> float:  # float32 linspace, exactly as torchvision
        return torch.linspace(lo, hi, num_bins)[magnitude].item()

    table = {
        "ShearX": bin_of(0.0, 0.3), "ShearY": bin_of(0.0, 0.3),
        "TranslateX": bin_of(0.0, 150.0 / 331.0 * width),
        "TranslateY": bin_of(0.0, 150.0 / 331.0 * height),
        "Rotate": bin_of(0.0, 30.0),
        "Brightness": bin_of(0.0, 0.9), "Color": bin_of(0.0, 0.9),
        "Contrast": bin_of(0.0, 0.9), "Sharpness": bin_of(0.0, 0.9),
        "Posterize": float(8 - round(magnitude / ((num_bins - 1) / 4))),
        "Solarize": bin_of(255.0, 0.0),
    }
    return [table.get(name, 0.0) for name in OPS]


# ----------------------------------------------------------------------------- geometry
# Pixel coordinates: pixel (i, j) has its centre at x=j, y=i; x to the right, y down.
# Maps are *inverse* (output pixel -> source pixel), the form a gather/grid_sample needs.


def _identity_maps(m: Tensor) -> Tensor:
    """(N, 2, 3) identity inverse maps, ``src = map @ [x, y, 1]``, with ``m``'s dtype/device."""
    return torch.eye(2, 3, dtype=m.dtype, device=m.device).repeat(m.shape[0], 1, 1)


def warp_nearest(x: Tensor, inverse: Tensor) -> Tensor:
    """Warp float (N, C, H, W) images by per-sample inverse affine maps, nearest pixel, fill 0.

    ``inverse`` (N, 2, 3) maps output pixel coordinates to input ones; it is converted to
    the normalised coordinates of ``affine_grid``/``grid_sample`` (align_corners=False, where
    pixel i's centre sits at (2i + 1) / size - 1), which beat a hand-written gather on CPU.
    """
    n, c, h, w = x.shape
    kw = {"dtype": inverse.dtype, "device": inverse.device}
    to_norm = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1]], **kw)
    from_norm = torch.tensor([[w / 2, 0, (w - 1) / 2], [0, h / 2, (h - 1) / 2], [0, 0, 1]], **kw)
    theta = to_norm[:, :2] @ inverse @ from_norm  # to_norm's last row is (0, 0, 1)
    theta[:, :, 2] += to_norm[:, 2]
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# Geometric RandAugment ops as inverse maps (m: signed magnitudes (N,), image height, width),
# so that all images taking any geometric op in a RandAugment slot share one warp.


def _shear_x_map(m: Tensor, h: int, w: int) -> Tensor:
    # torchvision shears about the top-left corner (pixel coordinate -0.5).
    inv = _identity_maps(m)
    inv[:, 0, 1], inv[:, 0, 2] = m, 0.5 * m
    return inv


def _shear_y_map(m: Tensor, h: int, w: int) -> Tensor:
    inv = _identity_maps(m)
    inv[:, 1, 0], inv[:, 1, 2] = m, 0.5 * m
    return inv


def _translate_x_map(m: Tensor, h: int, w: int) -> Tensor:
    inv = _identity_maps(m)
    inv[:, 0, 2] = -m.trunc()  # torchvision: int(magnitude) pixels
    return inv


def _translate_y_map(m: Tensor, h: int, w: int) -> Tensor:
    inv = _identity_maps(m)
    inv[:, 1, 2] = -m.trunc()
    return inv


def _rotate_map(m: Tensor, h: int, w: int) -> Tensor:
    """Counter-clockwise rotation by ``m`` degrees about the image centre."""
    cx, cy = (w - 1) / 2, (h - 1) / 2
    cos, sin = torch.deg2rad(m).cos(), torch.deg2rad(m).sin()
    rows = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]
    return torch.stack(rows, dim=1).view(-1, 2, 3)


GEOMETRIC_MAPS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "ShearX": _shear_x_map, "ShearY": _shear_y_map,
    "TranslateX": _translate_x_map, "TranslateY": _translate_y_map, "Rotate": _rotate_map,
}


def _warp_op(inverse_map: Callable[[Tensor, int, int], Tensor]) -> OpFn:
    """Turn an inverse-map builder into an image op."""
    def op(x: Tensor, m: Tensor) -> Tensor:
        return warp_nearest(x, inverse_map(m, x.shape[-2], x.shape[-1]))
    return op


# ------------------------------------------------------------------- RandAugment ops
# Each op maps float images (N, C, H, W) holding integer values in [0, 255] and a signed
# per-sample magnitude (N,) to new images. Magnitudes are in torchvision's units: shear
# factor, pixels (truncated), degrees, enhance factor minus 1, bits kept, solarize threshold.
# Results are floored like torchvision's uint8 casts, so the ops act as on uint8 tensors.


def _identity(x: Tensor, m: Tensor) -> Tensor:
    return x


def _blend(x: Tensor, other: Tensor, m: Tensor) -> Tensor:
    """torchvision's ``_blend`` with ratio ``1 + m``: ``ratio * x + (1 - ratio) * other``.

    Clamped and floored like its uint8 cast. The two weights are formed in double precision
    as torchvision does with Python floats, so results match it bit for bit (floor makes
    one-ulp differences visible).
    """
    ratio = 1.0 + m.double()
    a, b = (v.to(x.dtype).view(-1, 1, 1, 1) for v in (ratio, 1.0 - ratio))
    return (a * x + b * other).clamp_(0, 255).floor_()


def _grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma of RGB images (N, 1, H, W), floored like a uint8 cast."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).floor_().unsqueeze(1)


def _brightness(x: Tensor, m: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), m)


def _color(x: Tensor, m: Tensor) -> Tensor:
    if x.shape[1] != 3:  # saturation is undefined for grayscale; PIL/torchvision return as is
        return x
    return _blend(x, _grayscale(x), m)


def _contrast(x: Tensor, m: Tensor) -> Tensor:
    gray = _grayscale(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), m)


def _sharpness(x: Tensor, m: Tensor) -> Tensor:
    if min(x.shape[-2:]) <= 2:
        return x
    # torchvision's smoothing kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (3x3 box sum +
    # 4 * centre) / 13; shifted adds beat a grouped conv2d or avg_pool2d by ~5x on CPU.
    rows = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    smooth = box.add_(x[..., 1:-1, 1:-1], alpha=4).div_(13).round_()
    blurred = x.clone()
    blurred[..., 1:-1, 1:-1] = smooth  # the one-pixel border is kept, as in torchvision
    return _blend(x, blurred, m)


def _posterize(x: Tensor, m: Tensor) -> Tensor:
    step = torch.pow(2.0, 8 - m.trunc()).view(-1, 1, 1, 1)  # keep the top `m` bits
    return (x * (1 / step)).floor_().mul_(step)  # powers of two: exact in float


def _solarize(x: Tensor, m: Tensor) -> Tensor:
    return torch.where(x >= m.view(-1, 1, 1, 1), 255 - x, x)


def _autocontrast(x: Tensor, m: Tensor) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi == lo  # constant channels are left unchanged, as in torchvision
    scale = torch.where(flat, 1.0, 255.0 / (hi - lo).clamp_min(1))
    lo = torch.where(flat, 0.0, lo)
    return ((x - lo) * scale).clamp_(0, 255).floor_()


def _equalize(x: Tensor, m: Tensor) -> Tensor:
    """Per-channel histogram equalisation with torchvision's (PIL's) lookup table."""
    n, c, h, w = x.shape
    v = x.long().reshape(n * c, h * w)
    # One bincount for all channels: offset each channel's values into its own 256 bins.
    offsets = torch.arange(n * c, device=x.device).unsqueeze(1) * 256
    hist = torch.bincount((v + offsets).flatten(), minlength=n * c * 256).view(n * c, 256)
    last = hist.gather(1, v.amax(dim=1, keepdim=True))  # count of the highest value present
    step = torch.div(h * w - last, 255, rounding_mode="floor")
    lut = torch.div(hist.cumsum(1) + step // 2, step.clamp_min(1), rounding_mode="floor")
    lut = F.pad(lut, (1, 0))[:, :-1].clamp_(0, 255)
    identity = torch.arange(256, device=x.device).expand_as(lut)
    lut = torch.where(step == 0, identity, lut)  # degenerate histogram: leave channel as is
    return lut.gather(1, v).to(x.dtype).view(n, c, h, w)


OP_FUNCS: dict[str, OpFn] = {
    "Identity": _identity, **{name: _warp_op(fn) for name, fn in GEOMETRIC_MAPS.items()},
    "Brightness": _brightness, "Color": _color, "Contrast": _contrast,
    "Sharpness": _sharpness, "Posterize": _posterize, "Solarize": _solarize,
    "AutoContrast": _autocontrast, "Equalize": _equalize,
}
assert tuple(OP_FUNCS) == OPS
# Geometric ops have consecutive ids, so after sorting by op they form one slice.
_GEO = range(OPS.index("ShearX"), OPS.index("Rotate") + 1)
assert {OPS[i] for i in _GEO} == set(GEOMETRIC_MAPS)


# ------------------------------------------------------------------------- stages


def crop_flip(x: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random crop (input size, zero padding ``padding``) and horizontal flip (p=0.5).

    Both are integer per-sample row/column shifts, so one exact gather on the uint8 batch
    does them, with no padded copy of the batch.
    """
    n, c, h, w = x.shape
    gdev = generator.device
    shift = torch.randint(-padding, padding + 1, (n, 2), generator=generator, device=gdev)
    flipped = torch.randint(0, 2, (n, 1), generator=generator, device=gdev).bool() & flip
    shift, flipped = shift.to(x.device), flipped.to(x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flipped, cols.flip(1), cols) + shift[:, :1]  # source column per output
    rows = torch.arange(h, device=x.device).expand(n, h) + shift[:, 1:]
    inside = ((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1)
    index = rows.unsqueeze(2) * w + cols.unsqueeze(1)
    # Pixels from the padding read a zero appended after the last pixel of each channel.
    index = torch.where(inside, index, h * w).view(n, 1, h * w).expand(n, c, h * w)
    source = F.pad(x.reshape(n, c, h * w), (0, 1))
    return source.gather(2, index).view(n, c, h, w)


def rand_augment(
    x: Tensor, num_ops: int, magnitude: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """torchvision-style RandAugment with the op sequence drawn independently per image.

    ``x`` is float (N, C, H, W) with values in [0, 255]. Returns the augmented images and the
    chosen op indices into ``OPS``, shape (N, num_ops), on the generator's device.
    """
    n, _, h, w = x.shape
    gdev = generator.device
    ops = torch.randint(0, len(OPS), (n, num_ops), generator=generator, device=gdev)
    signs = torch.randint(0, 2, (n, num_ops), generator=generator, device=gdev) * 2 - 1
    table = torch.tensor(randaugment_magnitudes(magnitude, h, w), device=gdev)
    signed = torch.tensor([name in SIGNED for name in OPS], device=gdev)
    mags = table[ops] * torch.where(signed[ops], signs, 1)
    # Keep the batch sorted by the current slot's op, so each op runs on a contiguous slice
    # and can write its result in place; `perm` maps sorted positions to original samples.
    perm = torch.arange(n, device=gdev)
    for k in range(num_ops):
        order = torch.argsort(ops[perm, k], stable=True)
        perm = perm[order]
        x = x.index_select(0, order.to(x.device))
        ms = mags[perm, k].to(x.device, x.dtype)
        bounds = [0, *torch.bincount(ops[:, k], minlength=len(OPS)).cumsum(0).tolist()]
        lo, hi = bounds[_GEO.start], bounds[_GEO.stop]
        if hi > lo:  # one warp for all geometric ops of this slot
            maps = [GEOMETRIC_MAPS[OPS[i]](ms[bounds[i]:bounds[i + 1]], h, w) for i in _GEO]
            x[lo:hi] = warp_nearest(x[lo:hi], torch.cat(maps))
        for i, fn in enumerate(OP_FUNCS.values()):
            a, b = bounds[i], bounds[i + 1]
            if b > a and i not in _GEO and fn is not _identity:
                x[a:b] = fn(x[a:b], ms[a:b])
    return x.index_select(0, torch.argsort(perm).to(x.device)), ops


def _normalize_(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """In place: [0, 255] floats -> (x / 255 - mean) / std."""
    return x.div_(255.0).sub_(mean).div_(std)


def _stats(mean: Sequence[float], std: Sequence[float], channels: int,
           device: torch.device) -> tuple[Tensor, Tensor]:
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} entries, got {len(mean)}/{len(std)}")
    def as_col(v: Sequence[float]) -> Tensor:
        return torch.tensor(list(v), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return as_col(mean), as_col(std)


# -------------------------------------------------------------------------- API


@dataclass
class AugmentConfig:
    """Augmentation recipe. Defaults: crop + flip only; the paper adds RA(2, 9) and mixing."""

    crop_padding: int = 4           # 0 disables crop
    flip: bool = True
    randaugment_ops: int = 0        # 0 disables RandAugment; paper uses 2
    randaugment_magnitude: int = 9
    mixup_alpha: float = 0.0        # 0 disables; paper 0.8
    cutmix_alpha: float = 0.0       # 0 disables; paper 1.0
    mix_prob: float = 1.0           # probability a batch is mixed at all


@dataclass
class Batch:
    """An augmented batch; under MixUp/CutMix the target is
    ``mix_weight * targets + (1 - mix_weight) * targets_b``."""

    images: Tensor                  # float32 (B, C, H, W), normalised
    targets: Tensor                 # int64 (B,)
    targets_b: Tensor | None = None  # permuted targets when mixed
    mix_weight: float = 1.0         # weight of `targets` (MixUp's lambda)

    def loss(self, logits: Tensor) -> Tensor:
        """Mean cross-entropy against the (possibly mixed) targets."""
        loss = F.cross_entropy(logits, self.targets)
        if self.targets_b is None:
            return loss
        other = F.cross_entropy(logits, self.targets_b)
        return self.mix_weight * loss + (1 - self.mix_weight) * other

    def correct(self, logits: Tensor) -> Tensor:
        """Float count of correct predictions, weighted by mix_weight over both label sets when
        mixed."""
        pred = logits.argmax(dim=1)
        hits = (pred == self.targets).sum().float()
        if self.targets_b is None:
            return hits
        other = (pred == self.targets_b).sum().float()
        return self.mix_weight * hits + (1 - self.mix_weight) * other


def _augment(x: Tensor, config: AugmentConfig, mean: Tensor, std: Tensor,
             generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Per-sample stages shared by the batch and single-image paths: uint8 -> normalised float."""
    if config.crop_padding > 0 or config.flip:
        x = crop_flip(x, config.crop_padding, config.flip, generator)
    x = x.float()
    ops = None
    if config.randaugment_ops > 0:
        x, ops = rand_augment(x, config.randaugment_ops, config.randaugment_magnitude, generator)
    return _normalize_(x, mean, std), ops


def augment_single_image(img_uint8_chw: Tensor, config: AugmentConfig, mean: Sequence[float],
                         std: Sequence[float], generator: torch.Generator) -> Tensor:
    """Crop/flip/RandAugment/normalise ONE (C, H, W) uint8 image (the DataLoader-worker path).

    Runs the batch implementation on a batch of one; mixing is a batch-level step and is skipped.
    """
    m, s = _stats(mean, std, img_uint8_chw.shape[0], img_uint8_chw.device)
    return _augment(img_uint8_chw.unsqueeze(0), config, m, s, generator)[0][0]


class BatchAugmenter:
    """Augments uint8 batches on their own device; see the module docstring for the recipe.

    ``last_ops`` (RandAugment op indices per image) and ``last_mix`` ("none", "mixup" or
    "cutmix") describe the latest train-mode call, for inspection and logging.
    """

    def __init__(self, config: AugmentConfig, mean: Sequence[float], std: Sequence[float],
                 generator: torch.Generator | None = None, seed: int = 0) -> None:
        self.config = config
        self.mean, self.std = list(mean), list(std)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self._stats_cache: dict[tuple[torch.device, int], tuple[Tensor, Tensor]] = {}
        self.last_ops: Tensor | None = None
        self.last_mix = "none"

    def _device_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        key = (x.device, x.shape[1])
        if key not in self._stats_cache:
            self._stats_cache[key] = _stats(self.mean, self.std, x.shape[1], x.device)
        return self._stats_cache[key]

    def __call__(self, images_uint8: Tensor, labels: Tensor, train: bool = True) -> Batch:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise TypeError("expected a uint8 batch of shape (B, C, H, W)")
        labels = labels.to(images_uint8.device, torch.long)
        mean, std = self._device_stats(images_uint8)
        if not train:
            return Batch(_normalize_(images_uint8.float(), mean, std), labels)
        x, self.last_ops = _augment(images_uint8, self.config, mean, std, self.generator)
        return self._mix(x, labels)

    def _mix(self, x: Tensor, labels: Tensor) -> Batch:
        """One mode and one lambda for the whole batch, partner = random permutation."""
        cfg = self.config
        modes = [name for name, alpha in (("mixup", cfg.mixup_alpha), ("cutmix", cfg.cutmix_alpha))
                 if alpha > 0]
        self.last_mix = "none"
        if not modes:
            return Batch(x, labels)
        # torch has no generator-driven Beta sampler, so the per-batch scalars come from a
        # Python RNG seeded by one draw of our generator: still a single reproducible stream.
        seed = torch.randint(0, 2**62, (1,), generator=self.generator,
                             device=self.generator.device).item()
        rng = random.Random(seed)
        if rng.random() >= cfg.mix_prob:
            return Batch(x, labels)
        mode = modes[0] if len(modes) == 1 else rng.choice(modes)
        perm = torch.randperm(x.shape[0], generator=self.generator,
                              device=self.generator.device).to(x.device)
        if mode == "mixup":
            mix_weight = rng.betavariate(cfg.mixup_alpha, cfg.mixup_alpha)
            x = torch.lerp(x[perm], x, mix_weight)  # mix_weight x + (1 - mix_weight) x[perm]
        else:
            mix_weight = rng.betavariate(cfg.cutmix_alpha, cfg.cutmix_alpha)
            h, w = x.shape[-2:]
            cx, cy = rng.randrange(w), rng.randrange(h)
            half = 0.5 * math.sqrt(1.0 - mix_weight)  # box side: sqrt(1 - mix_weight) size
            rw, rh = int(half * w), int(half * h)
            x1, x2 = max(cx - rw, 0), min(cx + rw, w)
            y1, y2 = max(cy - rh, 0), min(cy + rh, h)
            x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
            # The box was clipped at the border: the weight is what is left of the image.
            mix_weight = 1.0 - (x2 - x1) * (y2 - y1) / (w * h)
        self.last_mix = mode
        return Batch(x, labels, labels[perm], float(mix_weight))

    def state_dict(self) -> dict:
        """RNG state, so a resumed run draws exactly the same augmentations."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
