"""One flat, typed description of a training run, and ``key=value`` overrides for it."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .augment import NUM_BINS


@dataclass
class TrainConfig:
    """Everything a run needs. Presets fill it; ``--set key=value`` edits it."""

    # Data
    dataset: str = "synthetic"
    data_dir: str | None = None
    num_train: int | None = None  # class-balanced subset; None = all
    num_test: int | None = None
    # Model: a registry name plus keyword arguments (``--set model.dim=128``)
    model: str = "mlp"
    model_args: dict[str, Any] = field(default_factory=dict)
    # Optimisation
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"  # sgd | adamw | muon (Muon on 2-D hidden weights + AdamW)
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.0  # SGD
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    muon_lr: float = 1e-2
    muon_adamw_betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "cosine"  # cosine | constant
    warmup_epochs: float = 0.0
    eta_min: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    # Augmentation (see sigreg.train.augment.AugmentConfig)
    crop_padding: int = 4
    flip: bool = True
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Regularizer
    sigreg: str = "none"  # none | weak | strong | vicreg (baseline: VICReg's var + cov terms)
    alpha: float = 0.1  # total = (1 - alpha) * task + alpha * reg
    sketch_dim: int | None = 64
    # K of each regularized layer in order, "16,16,64,none,..." (none: full covariance);
    # overrides sketch_dim when set
    sketch_dim_per_layer: str | None = None
    sketch: str = "resample"  # resample | fixed
    t_max: float = 3.0
    num_points: int = 17
    vicreg_var_weight: float = 25.0  # VICReg's mu; sigreg=vicreg only
    vicreg_cov_weight: float = 1.0  # VICReg's nu; sigreg=vicreg only
    # Run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    amp: bool = True  # bf16 autocast on CUDA
    compile: bool = False
    eval_batch_size: int = 1000
    monitor_every: int = 50  # steps between effective-dimension logs; 0 = off
    collapse_threshold: float = 0.99  # warn when a layer's mean cosine stays above this
    description: str = ""
    preset: str = ""  # the preset the run started from ("" when built by hand)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        cfg = cls(**data)
        cfg.betas = tuple(cfg.betas)
        cfg.muon_adamw_betas = tuple(cfg.muon_adamw_betas)
        return cfg

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first setting outside its allowed range; else ``self``.

        Runs before any file is touched, so a bad setting never costs a run directory.
        """
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"{key} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, key)!r}")
        for key, (low, high, rule) in RANGES.items():
            value = getattr(self, key)
            if value is None and key in OPTIONAL:
                continue
            if not _in_range(value, low, high, key in ABOVE_LOW):
                raise ValueError(f"{key} must be {rule}, got {value!r}")
        for key in ("betas", "muon_adamw_betas"):
            if not all(_in_range(b, 0.0, 1.0) and b < 1 for b in getattr(self, key)):
                raise ValueError(f"{key} must be two numbers in [0, 1), got {getattr(self, key)!r}")
        if self.eta_min > self.lr:
            raise ValueError(f"eta_min must not exceed lr ({self.lr}), got {self.eta_min}")
        if self.data_dir is not None and not self.data_dir.strip():
            raise ValueError("data_dir must be a directory path or none, got an empty string")
        self.layer_sketch_dims()
        return self

    def layer_sketch_dims(self) -> list[int | None] | None:
        """``sketch_dim_per_layer`` parsed: K per regularized layer (None: full), or None
        when unset. ValueError naming the setting for anything but positive integers and
        none, comma-separated."""
        if self.sketch_dim_per_layer is None:
            return None
        items = [item.strip().lower() for item in self.sketch_dim_per_layer.split(",")]
        if not all(i == "none" or (i.isdigit() and int(i) >= 1) for i in items):
            raise ValueError("sketch_dim_per_layer must be comma-separated positive integers "
                             f"or none, one per regularized layer, got {self.sketch_dim_per_layer!r}")
        return [None if i == "none" else int(i) for i in items]


CHOICES = {
    "optimizer": ("sgd", "adamw", "muon"),
    "schedule": ("cosine", "constant"),
    "sigreg": ("none", "weak", "strong", "vicreg"),
    "sketch": ("resample", "fixed"),
    "device": ("auto", "cpu", "cuda", "mps"),
}

INF = math.inf
# key: (lowest, highest, the rule as the error message states it). Bounds are inclusive, but
# for the keys in ABOVE_LOW the value must exceed the lowest; an int lowest asks for an integer.
RANGES: dict[str, tuple[float, float, str]] = {
    "num_train": (1, INF, "a positive integer or none (all)"),
    "num_test": (1, INF, "a positive integer or none (all)"),
    "epochs": (1, INF, "a positive integer"),
    "batch_size": (2, INF, "an integer >= 2"),
    "lr": (0.0, INF, "a finite number > 0"),
    "weight_decay": (0.0, INF, "a finite number >= 0"),
    "momentum": (0.0, 1.0, "a number in [0, 1]"),
    "muon_lr": (0.0, INF, "a finite number > 0"),
    "warmup_epochs": (0.0, INF, "a finite number >= 0"),
    "eta_min": (0.0, INF, "a finite number >= 0"),
    "grad_clip": (0.0, INF, "a finite number >= 0 (0 = off)"),
    "crop_padding": (0, INF, "an integer >= 0 (0 = off)"),
    "randaugment_ops": (0, INF, "an integer >= 0 (0 = off)"),
    "randaugment_magnitude": (0, NUM_BINS - 1, f"an integer in [0, {NUM_BINS - 1}]"),
    "mixup_alpha": (0.0, INF, "a finite number >= 0 (0 = off)"),
    "cutmix_alpha": (0.0, INF, "a finite number >= 0 (0 = off)"),
    "alpha": (0.0, 1.0, "a number in [0, 1]"),
    "sketch_dim": (1, INF, "a positive integer or none (full covariance)"),
    "t_max": (0.0, INF, "a finite number > 0"),
    "num_points": (2, INF, "an integer >= 2"),
    "vicreg_var_weight": (0.0, INF, "a finite number >= 0"),
    "vicreg_cov_weight": (0.0, INF, "a finite number >= 0"),
    "seed": (0, 2**63 - 1, "an integer in [0, 2**63 - 1]"),
    "eval_batch_size": (1, INF, "a positive integer"),
    "monitor_every": (0, INF, "an integer >= 0 (0 = off)"),
    "collapse_threshold": (0.0, 1.0, "a number in [0, 1]"),
}
ABOVE_LOW = {"lr", "muon_lr", "t_max"}
OPTIONAL = {"num_train", "num_test", "sketch_dim"}


def _in_range(value: Any, low: float, high: float, above_low: bool = False) -> bool:
    """A real, finite number (bools excluded) in [low, high]; an integer where low is one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if isinstance(low, int) and value != int(value):
        return False
    return (low < value if above_low else low <= value) and value <= high


def _parse_value(text: str) -> Any:
    """JSON where possible (numbers, true/false, null, lists), otherwise the raw string."""
    lowered = {"none": "null", "true": "true", "false": "false"}.get(text.lower(), text)
    try:
        return json.loads(lowered)
    except json.JSONDecodeError:
        return text


def _coerce(key: str, value: Any, annotation: str) -> Any:
    if value is None:
        if "None" not in annotation:
            raise ValueError(f"{key} cannot be none")
        return None
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise ValueError(f"{key} expects true or false, got {value!r}")
        return value
    if "tuple" in annotation:
        if not (isinstance(value, list) and len(value) == 2):
            raise ValueError(f"{key} expects two numbers like [0.9,0.999], got {value!r}")
        return tuple(float(v) for v in value)
    if "int" in annotation and "float" not in annotation:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError(f"{key} expects an integer, got {value!r}")
        return int(value)
    if "float" in annotation:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} expects a number, got {value!r}")
        return float(value)
    return str(value)


def apply_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
    """A copy of ``cfg`` with ``key=value`` items applied (``model.KEY=V`` for model args)."""
    cfg = dataclasses.replace(cfg, model_args=dict(cfg.model_args))
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        value = _parse_value(text.strip())
        if key.startswith("model."):
            cfg.model_args[key[len("model."):]] = value
            continue
        if key not in fields or key == "model_args":
            valid = ", ".join(n for n in fields if n != "model_args")
            raise ValueError(f"unknown setting {key!r}; valid: {valid}, model.<arg>")
        annotation = str(fields[key].type)
        # String settings take the text as is ("none" is a sigreg choice, not null; a
        # data_dir may look like a number); optional ones read none/null as None.
        if annotation == "str":
            value = text.strip()
        elif annotation == "str | None":
            value = None if value is None else text.strip()
        else:
            value = _coerce(key, value, annotation)
        setattr(cfg, key, value)
    return cfg.validate()
