"""One flat, typed description of a training run, and ``key=value`` overrides for it.

Each setting is declared once, as a :class:`TrainConfig` field made by :func:`setting`: its
type (the annotation), default, range or choices, what ``none`` and ``0`` mean, whether it may
change on resume, and a line of help. Validation, ``--set`` parsing, the resume rules
(:data:`sigreg.train.rundir.FREE_ON_RESUME`), ``sigreg train --help`` and the settings
table (:func:`settings_markdown`) are all derived from :data:`SETTINGS`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from .._renamed import renamed_message
from ._words import did_you_mean
from .augment import NUM_BINS
from .data import DATASETS

INF = math.inf
SEED_MAX = 2**63 - 1
# On resume a setting may change freely (it does not change what the finished epochs
# computed), only with --allow-change, or never (another value is another run).
FREE, ASK, NEVER = "free", "allow-change", "never"


@dataclass(frozen=True)
class Setting:
    """The declaration of one setting. ``name``, ``kind``, ``optional`` and ``default`` are
    filled from the :class:`TrainConfig` field it is attached to."""

    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None  # numbers: the lowest value allowed (inclusive unless above_low)
    high: float = INF
    above_low: bool = False
    below_high: bool = False
    none: str | None = None  # what none means, for settings that may be none
    zero: str | None = None  # what 0 means, where it switches something off
    words: tuple[str, ...] = ()  # numbers: words accepted besides them (alpha's "auto")
    resume: str = ASK  # FREE, ASK (--allow-change) or NEVER
    name: str = ""
    kind: type = str  # str, int, float, bool, tuple (two floats) or dict (model_args)
    optional: bool = False
    default: Any = None

    def rule(self) -> str:
        """The values accepted, in the words of the error messages."""
        if self.choices:
            text = "one of " + ", ".join(self.choices)
        elif self.kind is bool:
            text = "true or false"
        elif self.kind is tuple:
            text = f"two numbers in {self._interval()}"
        elif self.kind is int:
            if self.high < INF:
                text = f"an integer in {self._interval()}"
            else:
                text = "a positive integer" if self.low == 1 else f"an integer >= {self.low}"
        elif self.kind is float:
            if self.high < INF:
                text = f"a number in {self._interval()}"
            else:
                text = f"a finite number {'>' if self.above_low else '>='} {_show(self.low)}"
        elif self.kind is dict:
            text = "set one with model.<arg>=value"
        else:
            text = "text"
        if self.zero:
            text += f" (0 = {self.zero})"
        if self.words:
            text += "".join(f" or {word}" for word in self.words)
        if self.none:
            text += f" or none ({self.none})"
        return text

    def _interval(self) -> str:
        return (f"{'(' if self.above_low else '['}{_show(self.low)}, {_show(self.high)}"
                f"{')' if self.below_high else ']'}")


def _show(number: float) -> str:
    return "2**63 - 1" if number == SEED_MAX else f"{number:g}"


def setting(default: Any, help: str, **declaration: Any) -> Any:
    """A :class:`TrainConfig` field holding its :class:`Setting` (see there for the keywords)."""
    metadata = {"setting": Setting(help, **declaration)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything a run needs. Presets fill it; ``--set key=value`` edits it."""

    # Data
    dataset: str = setting("synthetic", f"the dataset: {', '.join(DATASETS)} (checked when it "
                           "loads)")
    data_dir: str | None = setting(
        None, "where the dataset lives", none="./data, $SIGREG_DATA or the system copy",
        resume=FREE)
    num_train: int | None = setting(None, "a class-balanced subset of the training images",
                                    low=1, none="all")
    num_test: int | None = setting(None, "a class-balanced subset of the test images",
                                   low=1, none="all")
    # Model: a registry name plus keyword arguments (``--set model.dim=128``)
    model: str = setting("mlp", "the model: a name registered in sigreg.train.models "
                         "(checked when it is built)")
    model_args: dict[str, Any] = setting(  # noqa: RUF009 (a field with a default_factory)
        {}, "the model's keyword arguments (sizes, init, ...)")
    # Optimisation
    epochs: int = setting(10, "passes over the training set (a resume extends or shortens the "
                          "run; the schedule follows)", low=1, resume=FREE)
    batch_size: int = setting(128, "images per step (the global batch under torchrun)", low=2)
    optimizer: str = setting("adamw", "muon: Muon on the 2-D hidden weights, AdamW on the rest",
                             choices=("sgd", "adamw", "muon"))
    lr: float = setting(1e-3, "learning rate (AdamW's, under muon)", low=0.0, above_low=True)
    weight_decay: float = setting(5e-4, "weight decay", low=0.0)
    momentum: float = setting(0.0, "SGD momentum", low=0.0, high=1.0)
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW's betas, as [b1,b2]",
                                         low=0.0, high=1.0, below_high=True)
    muon_lr: float = setting(1e-2, "Muon's learning rate (optimizer=muon)", low=0.0,
                             above_low=True)
    muon_adamw_betas: tuple[float, float] = setting(
        (0.9, 0.95), "betas of the AdamW beside Muon (optimizer=muon)", low=0.0, high=1.0,
        below_high=True)
    schedule: str = setting("cosine", "learning-rate schedule after the warm-up",
                            choices=("cosine", "constant"))
    warmup_epochs: float = setting(0.0, "linear warm-up length, in epochs", low=0.0)
    eta_min: float = setting(0.0, "the cosine schedule's final learning rate (at most lr)",
                             low=0.0)
    grad_clip: float = setting(0.0, "maximum gradient norm", low=0.0, zero="off")
    # Augmentation (see sigreg.train.augment.AugmentConfig)
    crop_padding: int = setting(4, "random-crop padding in pixels", low=0, zero="off")
    flip: bool = setting(True, "random horizontal flips")
    randaugment_ops: int = setting(0, "RandAugment operations per image", low=0, zero="off")
    randaugment_magnitude: int = setting(9, "RandAugment magnitude", low=0, high=NUM_BINS - 1)
    mixup_alpha: float = setting(0.0, "MixUp's Beta(alpha, alpha)", low=0.0, zero="off")
    cutmix_alpha: float = setting(0.0, "CutMix's Beta(alpha, alpha)", low=0.0, zero="off")
    # Regularizer
    sigreg: str = setting("none", "the regularizer (vicreg: VICReg's variance + covariance "
                          "terms, the baseline)", choices=("none", "weak", "strong", "vicreg"))
    alpha: float | str = setting(
        0.1, "its weight: total = (1 - alpha) * task + alpha * reg; auto: 0.1, raised to at "
        "most 0.5 while the last regularized layer is below unit power and the regularizer's "
        "gradient grows it (sigreg.auto; the model runs uncompiled; with weak, set "
        "scale_invariant=true)", low=0.0, high=1.0, words=("auto",))
    sketch_dim: int | None = setting(64, "K, the sketch's width (weak) or number of directions "
                                     "(strong)", low=1, none="full covariance")
    sketch_dim_per_layer: str | None = setting(
        None, "K of each regularized layer in order, e.g. 16,16,64,none (none: full "
        "covariance); overrides sketch_dim", none="sketch_dim for every layer")
    sketch_policy: str = setting("resample", "a fresh sketch every step, or one fixed "
                                 "(formerly sketch)", choices=("resample", "fixed"))
    t_max: float = setting(3.0, "strong: the quadrature interval [0, t_max]", low=0.0,
                           above_low=True)
    num_points: int = setting(17, "strong: trapezoid nodes on [0, t_max]", low=2)
    scale_invariant: bool = setting(False, "weak: above unit power, isotropy at the features' "
                                    "own power, not unit variance (not in the paper)")
    vicreg_var_weight: float = setting(25.0, "VICReg's mu (sigreg=vicreg)", low=0.0)
    vicreg_cov_weight: float = setting(1.0, "VICReg's nu (sigreg=vicreg)", low=0.0)
    # Run
    seed: int = setting(0, "the seed of every random stream", low=0, high=SEED_MAX)
    device: str = setting("auto", "auto: CUDA, else MPS, else CPU",
                          choices=("auto", "cpu", "cuda", "mps"), resume=FREE)
    amp: bool = setting(True, "bf16 autocast on CUDA")
    compile: bool = setting(False, "torch.compile the model and the regularizer", resume=FREE)
    eval_batch_size: int = setting(1000, "test images per forward pass", low=1, resume=FREE)
    monitor_every: int = setting(50, "steps between effective-dimension logs", low=0,
                                 zero="off", resume=FREE)
    collapse_threshold: float = setting(0.99, "warn when a layer's mean cosine stays above this",
                                        low=0.0, high=1.0, resume=FREE)
    description: str = setting("", "free text kept with the run", resume=FREE)
    preset: str = setting("", "the preset the run started from (empty when built by hand)",
                          resume=NEVER)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The settings of ``to_dict``'s output, also as an older version saved them (a
        setting's former name, :data:`RENAMED_SETTINGS`, is read as the new one)."""
        data = dict(data)
        for old, new in RENAMED_SETTINGS.items():
            if old in data:
                if new in data:
                    raise ValueError(f"config has both {old!r} and {new!r}, the new name of "
                                     f"{old!r}; keep only {new!r}")
                data[new] = data.pop(old)
        unknown = sorted(set(data) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        cfg = cls(**data)
        for s in SETTINGS.values():
            if s.kind is tuple:  # JSON gives lists back
                setattr(cfg, s.name, tuple(getattr(cfg, s.name)))
        return cfg

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first setting outside its allowed range; else ``self``.

        Runs before any file is touched, so a bad setting never costs a run directory.
        """
        for s in SETTINGS.values():
            value = getattr(self, s.name)
            if s.choices and value not in s.choices:
                raise ValueError(f"{s.name} must be one of {', '.join(s.choices)}, got {value!r}")
            if s.low is None or (value is None and s.optional) or value in s.words:
                continue
            if not all(_in_range(v, s) for v in (value if s.kind is tuple else (value,))):
                raise ValueError(f"{s.name} must be {s.rule()}, got {value!r}")
        if self.alpha == "auto" and self.compile:
            raise ValueError("alpha=auto reads gradients with tensor hooks, which a compiled "
                             "model does not call: set compile=false, or a fixed alpha")
        if self.scale_invariant and self.sigreg != "weak":
            raise ValueError(f"scale_invariant applies to sigreg=weak only, got sigreg={self.sigreg}")
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


def _declared(f: dataclasses.Field, annotation: Any) -> Setting:
    """A field's Setting completed from its annotation (``int | None``: int, optional)."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    optional = type(None) in args
    kind = next((a for a in args if a is not type(None)), annotation) if args else annotation
    kind = typing.get_origin(kind) or kind  # tuple[float, float] -> tuple, dict[...] -> dict
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return dataclasses.replace(f.metadata["setting"], name=f.name, kind=kind,
                               optional=optional, default=default)


# Former names of settings: still read from saved configs (checkpoints, config.json of runs
# made before the rename), and accepted by --set with a FutureWarning, for one release.
RENAMED_SETTINGS = {"sketch": "sketch_policy"}

_HINTS = typing.get_type_hints(TrainConfig)
SETTINGS: dict[str, Setting] = {f.name: _declared(f, _HINTS[f.name])
                                for f in dataclasses.fields(TrainConfig)}
# Views of SETTINGS: the choice settings, and the numeric ranges as
# key: (lowest, highest, the rule as the error message states it).
CHOICES = {k: s.choices for k, s in SETTINGS.items() if s.choices}
RANGES: dict[str, tuple[float, float, str]] = {
    k: (s.kind(s.low), s.high, s.rule()) for k, s in SETTINGS.items()
    if s.low is not None and s.kind in (int, float)}


def _in_range(value: Any, s: Setting) -> bool:
    """A real, finite number (bools excluded) within ``s``'s bounds; an integer for int ones."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if s.kind is int and value != int(value):
        return False
    above = s.low < value if s.above_low else s.low <= value
    below = value < s.high if s.below_high else value <= s.high
    return above and below


def _parse_value(text: str) -> Any:
    """JSON where possible (numbers, true/false, null, lists), otherwise the raw string."""
    lowered = {"none": "null", "true": "true", "false": "false"}.get(text.lower(), text)
    try:
        return json.loads(lowered)
    except json.JSONDecodeError:
        return text


def parse_setting(s: Setting, text: str) -> Any:
    """The value of ``--set NAME=text`` for the setting ``s``, of its kind; ValueError else.

    Text settings take the text as is ("none" is a sigreg choice, not null; a data_dir may
    look like a number); optional ones read none/null as None.
    """
    text = text.strip()
    if text.lower() in s.words:
        return text.lower()
    value = _parse_value(text)
    if s.kind is str:
        return None if value is None and s.optional else text
    if value is None:
        if not s.optional:
            raise ValueError(f"{s.name} cannot be none")
        return None
    if s.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{s.name} expects true or false, got {value!r}")
        return value
    if s.kind is tuple:
        if not (isinstance(value, list) and len(value) == 2):
            raise ValueError(f"{s.name} expects two numbers like [0.9,0.999], got {value!r}")
        return tuple(float(v) for v in value)
    integer = s.kind is int
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (integer and not (math.isfinite(value) and value == int(value))):
        raise ValueError(f"{s.name} expects {'an integer' if integer else 'a number'}, "
                         f"got {value!r}")
    return int(value) if integer else float(value)


def apply_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
    """A copy of ``cfg`` with ``key=value`` items applied (``model.KEY=V`` for model args)."""
    cfg = dataclasses.replace(cfg, model_args=dict(cfg.model_args))
    keys = {item.partition("=")[0].strip() for item in items}
    for old, new in RENAMED_SETTINGS.items():
        if old in keys and new in keys:
            raise ValueError(f"--set got both {old!r} (deprecated) and {new!r}; give only "
                             f"{new!r}")
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key in RENAMED_SETTINGS:
            warnings.warn(renamed_message(key, RENAMED_SETTINGS[key], "--set", "setting"),
                          FutureWarning, stacklevel=2)
            key = RENAMED_SETTINGS[key]
        if key.startswith("model."):
            cfg.model_args[key[len("model."):]] = _parse_value(text.strip())
            continue
        if key not in SETTINGS or SETTINGS[key].kind is dict:
            valid = ", ".join(k for k, s in SETTINGS.items() if s.kind is not dict)
            raise ValueError(f"unknown setting {key!r}{did_you_mean(key, SETTINGS)}; valid: "
                             f"{valid}, model.<arg>")
        setattr(cfg, key, parse_setting(SETTINGS[key], text))
    return cfg.validate()


EMPTY = '""'
RESUME_WORDS = {FREE: "may change", ASK: "--allow-change", NEVER: "never changes"}


def format_value(value: Any) -> str:
    """A setting's value as ``--set`` reads it: none, true/false, text as is, lists as
    compact JSON (``model_args`` too, though ``--set`` takes it one ``model.<arg>`` at a time)."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        value = list(value)
    return "none" if value is None else json.dumps(value, separators=(",", ":"))


def show(cfg: TrainConfig) -> str:
    """Every setting of ``cfg``, one ``key=value`` line each, in declaration order."""
    return "\n".join(f"{k}={format_value(v)}" for k, v in cfg.to_dict().items())


def settings_help() -> str:
    """The settings for ``sigreg train --help``: name, default, values, help; the resume rule."""
    width = max(map(len, SETTINGS))
    lines = ["settings (--set KEY=VALUE; `sigreg presets --show NAME` gives a preset's):"]
    for s in SETTINGS.values():
        default = "" if s.kind is dict else f" [{format_value(s.default) or EMPTY}]"
        lines.append(f"  {s.name:{width}s}  {s.help}{default}; {s.rule()}")
    free, never = (", ".join(k for k, s in SETTINGS.items() if s.resume == r) for r in (FREE, NEVER))
    lines.append(f"on --resume, {free} may change; {never} never does; any other setting only "
                 "with --allow-change")
    return "\n".join(lines)


def settings_markdown() -> str:
    """The settings table of docs/toolkit.md (tests/test_settings.py checks that it holds it)."""
    lines = ["| setting | default | values | on resume | what it is |", "|---|---|---|---|---|"]
    for s in SETTINGS.values():
        default = "" if s.kind is dict else f"`{format_value(s.default) or EMPTY}`"
        lines.append(f"| `{s.name}` | {default} | {_markdown(s.rule())} | "
                     f"{RESUME_WORDS[s.resume]} | {_markdown(s.help)} |")
    return "\n".join(lines)


def _markdown(text: str) -> str:
    """Plain text for a Markdown table cell: ``*``, ``<`` and ``|`` escaped."""
    return re.sub(r"([*<|])", r"\\\1", text)
