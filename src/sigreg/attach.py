"""Attach SIGReg to layers of any model with forward hooks: no change to the model's code.

    handle = sigreg.attach(model, "blocks.*", alpha=0.1)
    loss = handle.combine(criterion(model(x), y))      # (1 - 0.1) * task + 0.1 * reg
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .functional import _check_weights, regularized_loss
from .modules import make_regularizer

LayerSpec = str | type | Callable[[str, nn.Module], bool]
Pool = str | Callable[[Any], torch.Tensor]
POOLS = ("mean", "flatten", "cls")


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern:
    """Module-name glob: ``*`` stays inside one dotted component, ``**`` crosses dots,
    ``?`` is one character, ``[...]`` / ``[!...]`` a character class."""
    out = re.escape(pattern).replace(r"\*\*", "\0").replace(r"\*", "[^.]*")
    out = out.replace("\0", ".*").replace(r"\?", "[^.]")
    out = out.replace(r"\[!", "[^").replace(r"\[", "[").replace(r"\]", "]")
    return re.compile(out + r"\Z")


def _matches(spec: LayerSpec, name: str, module: nn.Module) -> bool:
    if isinstance(spec, str):
        return _glob_regex(spec).match(name) is not None
    if isinstance(spec, type):
        return isinstance(module, spec)
    return bool(spec(name, module))


def resolve_layers(model: nn.Module, layers: LayerSpec | Sequence[LayerSpec]) -> list[str]:
    """Qualified names of the modules selected by ``layers``, in ``named_modules`` order.

    ``layers`` is a name ("blocks.3"), a glob ("blocks.*" matches blocks.0 but not
    blocks.0.attn; "**" crosses dots), a module type (``nn.Linear``), a predicate
    ``(name, module) -> bool``, or a list of these. Every entry must match something.
    """
    specs = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    if not specs:
        raise ValueError("layers is empty: name at least one layer to regularize")
    named = [(n, m) for n, m in model.named_modules() if n]
    for spec in specs:
        if not isinstance(spec, (str, type)) and not callable(spec):
            raise TypeError(f"a layer spec is a name, glob, module type or predicate, got {spec!r}")
        if not any(_matches(spec, n, m) for n, m in named):
            examples = ", ".join(n for n, _ in named[:12])
            raise ValueError(
                f"layer spec {spec!r} matches no module of {type(model).__name__}; "
                f"module names look like: {examples}"
            )
    return [n for n, m in named if any(_matches(s, n, m) for s in specs)]


def pool_features(output: Any, pool: Pool) -> torch.Tensor:
    """Turn a layer's output into features (N, C).

    - tuple/list outputs: the first element is used (hidden states, by convention), unless
      ``pool`` is a callable, which receives the raw output.
    - ``"mean"``: (N, C) as is; (B, T, C) mean over tokens (batch-first); (B, C, H, W) mean
      over H and W.
    - ``"flatten"``: (B, T, C) -> (B*T, C), every token a sample (language models).
    - ``"cls"``: (B, T, C) -> (B, C), the first token.
    """
    if callable(pool):
        return pool(output)
    x = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"cannot regularize a layer output of type {type(x).__name__}")
    if x.dim() == 2:
        return x
    if pool == "mean" and x.dim() in (3, 4):
        return x.mean(1) if x.dim() == 3 else x.mean((2, 3))
    if pool == "flatten" and x.dim() == 3:
        return x.reshape(-1, x.shape[-1])
    if pool == "cls" and x.dim() == 3:
        return x[:, 0]
    raise ValueError(f"pool={pool!r} cannot turn an output of shape {tuple(x.shape)} into (N, C)")


class SIGRegHandle:
    """The hooks placed by :func:`attach`, and the regularizer value they collect.

    Hooks work only when the layer is in training mode and autograd is on; in eval mode or
    under ``torch.no_grad()`` they return immediately. A layer called several times in one
    forward pass contributes the mean of its calls.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        regularizers: dict[str, nn.Module],
        pool: Pool,
        alpha: float | None,
        lam: float | None,
        keep_features: bool,
    ) -> None:
        self.names = names
        self.regularizers = regularizers
        self.pool = pool
        self.alpha, self.lam = alpha, lam
        self.keep_features = keep_features
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._last: dict[str, torch.Tensor] = {}
        self._features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._hooks = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Callable:
        regularizer = self.regularizers[name]

        # Runs eagerly under torch.compile: the sketch stream is Python state that would
        # otherwise force a recompile every step.
        @torch.compiler.disable
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            z = pool_features(output, self.pool)
            self._pending.setdefault(name, []).append(regularizer(z))
            if self.keep_features:
                self._features[name] = z.detach()

        return hook

    def loss(self) -> torch.Tensor:
        """Mean regularizer over the layers of the latest training forward pass.

        Consumes the collected values: calling it again before another forward pass raises.
        """
        if not self._pending:
            raise RuntimeError(
                "no training-mode forward pass with autograd since the last loss() call: "
                "run the model (model.train(), outside torch.no_grad()) first"
            )
        # A layer called once (the usual case) needs no stack + mean: fewer GPU launches.
        self._last = {n: v[0] if len(v) == 1 else torch.stack(v).mean()
                      for n, v in self._pending.items()}
        self._pending = {}
        return torch.stack(list(self._last.values())).mean()

    def combine(self, task_loss: torch.Tensor) -> torch.Tensor:
        """Task loss plus regularizer with the weighting given to :func:`attach`."""
        return regularized_loss(task_loss, self.loss(), alpha=self.alpha, lam=self.lam)

    def layer_losses(self) -> dict[str, float]:
        """Per-layer values of the latest :meth:`loss` call, as floats for logging."""
        return {n: float(v) for n, v in self.layer_loss_tensors().items()}

    def layer_loss_tensors(self) -> dict[str, torch.Tensor]:
        """Like :meth:`layer_losses` but detached tensors: no device sync, for accumulating."""
        return {n: v.detach() for n, v in self._last.items()}

    def features(self) -> dict[str, torch.Tensor]:
        """Detached pooled features of the latest forward (needs ``keep_features=True``)."""
        return dict(self._features)

    def state_dict(self) -> dict[str, Any]:
        """Sketch state (fixed sketches, resample counters) for exact checkpoint resume."""
        return {n: r.state_dict() for n, r in self.regularizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, r in self.regularizers.items():
            r.load_state_dict(state[n])

    def to(self, device: torch.device | str) -> SIGRegHandle:
        for r in self.regularizers.values():
            r.to(device)
        return self

    def remove(self) -> None:
        """Detach every hook; the model is as before :func:`attach`."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._pending, self._features = {}, {}

    def __enter__(self) -> SIGRegHandle:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"SIGRegHandle(layers={self.names}, regularizer={next(iter(self.regularizers.values()))})"


def attach(
    model: nn.Module,
    layers: LayerSpec | Iterable[LayerSpec],
    variant: str = "weak",
    sketch_dim: int | None = 64,
    pool: Pool = "mean",
    *,
    sketch: str = "resample",
    seed: int = 0,
    alpha: float | None = None,
    lam: float | None = None,
    distributed: bool | None = None,
    keep_features: bool = False,
    **variant_kwargs: Any,
) -> SIGRegHandle:
    """Regularize the outputs of ``layers`` of ``model`` with weak or strong SIGReg.

    Args:
        model: any ``nn.Module``; it is not modified apart from forward hooks.
        layers: names, globs ("blocks.*"), module types or a predicate; see
            :func:`resolve_layers`.
        variant: ``"weak"`` (covariance), ``"strong"`` (characteristic function), or
            ``"vicreg"``, VICReg's variance + covariance terms, a baseline to compare with
            (full covariance: ``sketch_dim``, ``sketch`` and ``seed`` do not apply).
        sketch_dim: K, sketch width (weak) or number of directions (strong). Weak: None
            or K >= C means the full covariance.
        pool: how outputs become (N, C); see :func:`pool_features`.
        sketch: ``"resample"`` or ``"fixed"``; see :mod:`sigreg.modules`.
        seed: base seed; layer i uses ``seed + i``. Use the same seed on every rank.
        alpha / lam: weighting used by :meth:`SIGRegHandle.combine`:
            ``(1 - alpha) * task + alpha * reg`` or ``task + lam * reg``. Default alpha=0.1.
        distributed: global-batch statistics under torch.distributed (None: automatic).
        keep_features: keep the latest pooled features for diagnostics.
        variant_kwargs: ``t_max``, ``num_points`` for the strong variant; ``gamma``,
            ``var_weight``, ``cov_weight``, ``eps`` for ``"vicreg"``.

    Returns:
        A :class:`SIGRegHandle`: ``handle.loss()``, ``handle.combine(task)``,
        ``handle.layer_losses()``, ``handle.remove()``.
    """
    if isinstance(layers, Iterable) and not isinstance(layers, (str, list, tuple)):
        layers = list(layers)
    if isinstance(pool, str) and pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS} or a callable, got {pool!r}")
    if alpha is None and lam is None:
        alpha = 0.1
    _check_weights(alpha, lam)
    names = resolve_layers(model, layers)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    regularizers = {
        n: make_regularizer(
            variant, sketch_dim, sketch=sketch, seed=seed + i, distributed=distributed,
            **variant_kwargs,
        ).to(device)
        for i, n in enumerate(names)
    }
    return SIGRegHandle(model, names, regularizers, pool, alpha, lam, keep_features)


class FeatureRecorder:
    """Records detached pooled outputs of some layers, only while switched on.

    For diagnostics: the hooks stay registered and cost one attribute check per call while
    off, so a trainer can switch recording on for the occasional monitored step, or a probe
    for a whole evaluation pass (unlike :func:`attach`, it also records in eval mode).

        with recorder.recording():
            model(x)
        feats = recorder.features   # {name: (N, C) tensor}
    """

    def __init__(self, model: nn.Module, layers: LayerSpec | Sequence[LayerSpec],
                 pool: Pool = "mean") -> None:
        self.names = resolve_layers(model, layers)
        self.pool = pool
        self.active = False
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._hooks = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable:
        @torch.compiler.disable
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.active:
                self.features[name] = pool_features(output, self.pool).detach()

        return hook

    @contextlib.contextmanager
    def recording(self):
        """Record during the ``with`` block; ``features`` then holds the last call per layer."""
        self.features = {}
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
