"""One flat, typed description of a training run, and ``key=value`` overrides for it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


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
    collapse_threshold: float = 0.02  # warn when effective dim < this fraction of width
    description: str = ""

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


CHOICES = {
    "optimizer": ("sgd", "adamw", "muon"),
    "schedule": ("cosine", "constant"),
    "sigreg": ("none", "weak", "strong", "vicreg"),
    "sketch": ("resample", "fixed"),
}


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
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        setattr(cfg, key, value)
    return cfg
