"""Attach SIGReg to layers of any model with forward hooks: no change to the model's code.

    handle = sigreg.attach(model, "blocks.*", alpha=0.1)
    loss = handle.combine(criterion(model(x), y))      # (1 - 0.1) * task + 0.1 * reg
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ._checks import check_choice, check_int
from ._projections import LayerProjections, in_current_layout
from .functional import _check_weights, regularized_loss
from .modules import Regularizer, make_regularizer

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


def _pool(output: Any, pool: Pool) -> tuple[torch.Tensor, int]:
    """A layer's output pooled, keeping the pooled dimensions, and the number of samples N.

    ``features.reshape(N, -1)`` is :func:`pool_features`. Keeping the dimensions makes the
    pooling's backward one kernel fewer (no unsqueeze), which counts on a GPU where the
    hooks of every layer are launch-bound.
    """
    if callable(pool):
        x = pool(output)
        if not (isinstance(x, torch.Tensor) and x.dim() == 2):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"a pool callable must return features (N, C), got {shape}")
        return x, x.shape[0]
    x = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"cannot regularize a layer output of type {type(x).__name__}")
    if x.dim() == 2:
        return x, x.shape[0]
    if pool == "mean" and x.dim() in (3, 4):
        return x.mean(1 if x.dim() == 3 else (2, 3), keepdim=True), x.shape[0]
    if pool == "flatten" and x.dim() == 3:
        return x, x.shape[0] * x.shape[1]
    if pool == "cls" and x.dim() == 3:
        return x[:, :1], x.shape[0]
    raise ValueError(f"pool={pool!r} cannot turn an output of shape {tuple(x.shape)} into (N, C)")


def pool_features(output: Any, pool: Pool) -> torch.Tensor:
    """Turn a layer's output into features (N, C).

    - tuple/list outputs: the first element is used (hidden states, by convention), unless
      ``pool`` is a callable, which receives the raw output and returns (N, C).
    - ``"mean"``: (N, C) as is; (B, T, C) mean over tokens (batch-first); (B, C, H, W) mean
      over H and W.
    - ``"flatten"``: (B, T, C) -> (B*T, C), every token a sample (language models).
    - ``"cls"``: (B, T, C) -> (B, C), the first token.
    """
    features, rows = _pool(output, pool)
    return features.reshape(rows, -1)


class _Call(NamedTuple):
    """One training-mode call of a regularized layer: its pooled output (any shape whose
    reshape to (rows, C) is the features), the layer's index in the handle's names, and
    the index of its regularizer (layers with different K have different ones)."""

    layer: int
    features: torch.Tensor
    rows: int
    part: int

    def group_key(self) -> tuple:
        # Calls stack together when they share a regularizer and their pooled tensors match
        # in shape, dtype and device.
        f = self.features
        return self.part, tuple(f.shape), self.rows, f.dtype, f.device


class _Part(NamedTuple):
    """The regularizer of some of a handle's layers (one per distinct K), its projection
    stream and its (possibly compiled) loss."""

    regularizer: Regularizer
    projections: LayerProjections
    compute: Callable


def _in_backward() -> bool:
    """True while autograd runs a backward pass, where activation checkpointing recomputes
    layers: their outputs are not a forward to regularize."""
    return torch._C._current_graph_task_id() != -1


# Live handles per hooked module: attaching twice to a layer warns.
_HOOKED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


class SIGRegHandle:
    """The hooks placed by :func:`attach`, and the regularizer of the layers they see.

    The hooks only pool each regularized layer's output and keep it; :meth:`loss` then
    computes the regularizer of every layer at once: calls stacked by (shape, dtype,
    device) into (L, N, C), one projection draw, one batched loss (one value per layer)
    and, under torch.distributed, one all-reduce per statistic, per group.

    A forward pass is a call of the model given to :func:`attach` in training mode with
    autograd on (in eval mode, under ``torch.no_grad()`` and inside a backward pass, where
    activation checkpointing recomputes layers, the hooks do nothing). A layer
    called several times in one pass contributes the mean of its calls. :meth:`loss`
    covers the latest ``accumulate`` passes (default 1: the latest forward); more passes
    since the last :meth:`loss` raise an error there, and the hooks only ever keep that
    many, so a handle whose loss is never asked for holds one step's features at most.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        regularizer: Regularizer | Sequence[Regularizer],
        pool: Pool,
        alpha: float | None,
        lam: float | None,
        keep_features: bool,
        accumulate: int = 1,
        seed: int = 0,
        compile: bool | dict[str, Any] = False,
        layer_parts: Sequence[int] | None = None,
    ) -> None:
        """``regularizer``: one for every layer, or several with ``layer_parts`` giving the
        index of each layer's (see ``sketch_dim`` of :func:`attach`)."""
        self.names = names
        regularizers = [regularizer] if isinstance(regularizer, Regularizer) else list(regularizer)
        self.regularizer = regularizers[0]  # the only one, unless K varies across layers
        self._layer_parts = list(layer_parts) if layer_parts is not None else [0] * len(names)
        self._parts = [_Part(r, LayerProjections(r, names, seed), _compiled(r.compute, compile))
                       for r in regularizers]
        self.pool = pool
        self.alpha, self.lam = alpha, lam
        self.keep_features = keep_features
        self.accumulate = accumulate
        self.seed = seed
        self._passes: collections.deque[list[_Call]] = collections.deque(maxlen=accumulate)
        self._forwards = 0  # training forwards of the model since the last loss()
        self._new_pass = False  # the model was called since the last recorded layer call
        self._averagings: dict[tuple, torch.Tensor] = {}
        self._last_names: list[str] = []
        self._last_values: torch.Tensor | None = None
        self._features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._hooked = [modules[n] for n in names]
        self._hooks = [model.register_forward_pre_hook(self._start_pass)]
        self._hooks += [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self._hooked)]
        for m in self._hooked:
            _HOOKED[m] = _HOOKED.get(m, 0) + 1

    # ---- hooks: pool and keep, nothing else ---------------------------------------------

    # The hooks run eagerly under torch.compile: they only record Python state.
    @torch.compiler.disable
    def _start_pass(self, module: nn.Module, args: Any) -> None:
        # The pass opens at its first recorded call: a forward that records nothing (eval
        # mode, no_grad, a recomputation inside backward) is not counted.
        if not _in_backward():
            self._new_pass = True

    def _hook(self, index: int) -> Callable:
        name = self.names[index]

        @torch.compiler.disable
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not (module.training and torch.is_grad_enabled()) or _in_backward():
                return
            features, rows = _pool(output, self.pool)
            if self._new_pass:
                self._new_pass = False
                self._forwards += 1
                self._passes.append([])  # the deque drops passes older than `accumulate`
            elif not self._passes:  # a layer called on its own, outside the model
                self._passes.append([])
            self._passes[-1].append(_Call(index, features, rows, self._layer_parts[index]))
            if self.keep_features:
                self._features[name] = features.detach().reshape(rows, -1)

        return hook

    # ---- the regularizer of all layers ----------------------------------------------------

    def loss(self) -> torch.Tensor:
        """Mean regularizer over the layers of the latest training forward pass (of the
        latest ``accumulate`` passes, each layer averaged over its calls).

        Consumes the recorded features: calling it again before another forward raises, as
        does calling it after more than ``accumulate`` forward passes.
        """
        calls = self._take_calls()
        names, values = self._layer_values(calls)
        self._last_names, self._last_values = names, values.detach()
        return values.mean()

    def _take_calls(self) -> list[_Call]:
        forwards = self._forwards
        calls = [c for p in self._passes for c in p]
        self.clear()
        if forwards > self.accumulate:
            raise RuntimeError(
                f"{forwards} training forward passes ran since the last loss(), but loss() "
                f"regularizes the latest {self.accumulate}: call loss() (or combine()) after "
                f"every forward, attach(..., accumulate={forwards}) to average several "
                "(gradient accumulation), or handle.clear() to drop a forward you do not "
                "regularize. The recorded features were dropped."
            )
        if not calls:
            raise RuntimeError(
                "no training-mode forward pass with autograd since the last loss() call: "
                "run the model (model.train(), outside torch.no_grad()) first"
            )
        return calls

    def clear(self) -> None:
        """Drop the features recorded since the last :meth:`loss` (e.g. a step trained
        without the regularizer)."""
        self._passes.clear()
        self._forwards = 0

    def _layer_values(self, calls: list[_Call]) -> tuple[list[str], torch.Tensor]:
        """Names of the layers called, and their regularizer values (L,) in that order."""
        groups: dict[tuple, list[_Call]] = {}
        for c in calls:
            groups.setdefault(c.group_key(), []).append(c)
        values, order = [], []
        for ordinal, group in enumerate(groups.values()):
            values.append(self._group_values(ordinal, group))
            order += [c.layer for c in group]
        for part in self._parts:
            part.projections.advance()
        flat = values[0] if len(values) == 1 else torch.cat([v.to(values[0].device) for v in values])
        layers = list(dict.fromkeys(order))
        if len(layers) < len(order):  # a layer called several times: the mean of its calls
            flat = self._averaging(tuple(order), flat.device, flat.dtype) @ flat
        return [self.names[i] for i in layers], flat

    def _group_values(self, ordinal: int, group: list[_Call]) -> torch.Tensor:
        """Regularizer of each call of one group, (L,), from their stack (L, N, C)."""
        z = torch.stack([c.features for c in group]).view(len(group), group[0].rows, -1)
        layers = tuple(c.layer for c in group)
        part = self._parts[group[0].part]
        return part.compute(z, part.projections.for_group(ordinal, layers, z))

    def _averaging(self, order: tuple[int, ...], device, dtype) -> torch.Tensor:
        """(L, E) matrix averaging E call values into each of the L layers, first-call order."""
        key = (order, device, dtype)
        if key not in self._averagings:
            layers = list(dict.fromkeys(order))
            a = torch.tensor([[float(o == i) for o in order] for i in layers], dtype=dtype)
            self._averagings[key] = (a / a.sum(1, keepdim=True)).to(device)
        return self._averagings[key]

    def combine(self, task_loss: torch.Tensor) -> torch.Tensor:
        """Task loss plus regularizer with the weighting given to :func:`attach`."""
        return regularized_loss(task_loss, self.loss(), alpha=self.alpha, lam=self.lam)

    def layer_losses(self) -> dict[str, float]:
        """Per-layer values of the latest :meth:`loss` call, as floats for logging."""
        values = [] if self._last_values is None else self._last_values.tolist()
        return dict(zip(self._last_names, values))

    def layer_loss_tensors(self) -> dict[str, torch.Tensor]:
        """Like :meth:`layer_losses` but detached 0-d tensors: no device sync, for
        accumulating."""
        if self._last_values is None:
            return {}
        return dict(zip(self._last_names, self._last_values.unbind()))

    def features(self) -> dict[str, torch.Tensor]:
        """Detached pooled features of the latest forward (needs ``keep_features=True``)."""
        return dict(self._features)

    # ---- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Sketch state for exact checkpoint resume: the resample draw count and the fixed
        sketches drawn so far (CPU tensors)."""
        states = [part.projections.state_dict() for part in self._parts]
        fixed = {name: t for state in states for name, t in state["fixed"].items()}
        return {"step": states[0]["step"], "fixed": fixed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a sigreg 0.1 handle's per-layer state keeps its
        fixed sketches). Missing, unknown or mismatched entries raise a ValueError."""
        if len(self._parts) == 1:
            self._parts[0].projections.load_state_dict(state)
            return
        # Split a sigreg 0.1 state's sketches by K too, not only today's.
        state = in_current_layout(state, self.names)
        if not isinstance(state, dict) or not isinstance(state.get("fixed", {}), dict):
            raise TypeError("a handle state is a dict {'step': int, 'fixed': {layer: tensor}} "
                            "from state_dict()")
        for index, part in enumerate(self._parts):
            mine = {self.names[i] for i, p in enumerate(self._layer_parts) if p == index}
            fixed = {n: t for n, t in state.get("fixed", {}).items()
                     if n in mine or n not in self.names}  # unknown names: the part refuses them
            part.projections.load_state_dict({**state, "fixed": fixed} if "fixed" in state else state)

    def to(self, device: torch.device | str) -> SIGRegHandle:
        """Kept for compatibility: projections follow the features' device by themselves."""
        for part in self._parts:
            part.projections.clear_cache()
        return self

    def remove(self) -> None:
        """Detach every hook; the model is as before :func:`attach`."""
        for h in self._hooks:
            h.remove()
        for m in self._hooked:
            _HOOKED[m] = _HOOKED.get(m, 1) - 1
        self._hooks, self._hooked = [], []
        self.clear()
        self._features = {}

    def __enter__(self) -> SIGRegHandle:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        regularizers = ", ".join(repr(p.regularizer) for p in self._parts)
        return f"SIGRegHandle(layers={self.names}, regularizer={regularizers})"


def _compiled(fn: Callable, compile: bool | dict[str, Any]) -> Callable:
    """``fn`` itself, or ``torch.compile(fn, **options)`` (``compile=True``: static
    shapes, one graph per group shape)."""
    if compile is False:
        return fn
    options = {"dynamic": False} if compile is True else dict(compile)
    return torch.compile(fn, **options)


def attach(
    model: nn.Module,
    layers: LayerSpec | Iterable[LayerSpec],
    variant: str = "weak",
    sketch_dim: int | None | Mapping[LayerSpec, int | None] = 64,
    pool: Pool = "mean",
    *,
    sketch: str = "resample",
    seed: int = 0,
    alpha: float | None = None,
    lam: float | None = None,
    distributed: bool | None = None,
    keep_features: bool = False,
    accumulate: int = 1,
    compile: bool | dict[str, Any] = False,
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
        sketch_dim: K, sketch width (weak) or number of directions (strong), an integer
            >= 1. Weak: None or K >= C means the full covariance. A mapping from layer specs
            to K sets it per layer: each layer takes the value of the first key that matches
            it (``{"blocks.0": 16, "**": 64}``); every layer must match a key and every key a
            layer. Layers with different K are computed in separate groups.
        pool: how outputs become (N, C); see :func:`pool_features`.
        sketch: ``"resample"`` (a fresh projection per layer every :meth:`~SIGRegHandle.loss`,
            all of a group drawn at once from (seed, step)) or ``"fixed"`` (layer i's drawn
            once from ``seed + i``); see :mod:`sigreg.modules`. Use the same seed on every
            rank.
        alpha / lam: weighting used by :meth:`SIGRegHandle.combine`:
            ``(1 - alpha) * task + alpha * reg`` or ``task + lam * reg``. Default alpha=0.1.
        distributed: global-batch statistics under torch.distributed (None: automatic).
        keep_features: keep the latest pooled features for diagnostics.
        accumulate: forward passes one :meth:`~SIGRegHandle.loss` averages (gradient
            accumulation, several views); 1: the latest forward only.
        compile: ``True`` (or a dict of ``torch.compile`` options) compiles the batched
            regularizer; the hooks and the projection draws stay eager.
        variant_kwargs: strong: ``t_max`` (half-width of [-t_max, t_max], default 3) and
            ``num_points`` (trapezoid nodes on [0, t_max] only, default 17; the paper's
            code's 17 points on [-5, 5] are ``t_max=5, num_points=9``); vicreg: ``gamma``,
            ``var_weight``, ``cov_weight``, ``eps``.

    Returns:
        A :class:`SIGRegHandle`: ``handle.loss()``, ``handle.combine(task)``,
        ``handle.layer_losses()``, ``handle.remove()``.

    Raises:
        TypeError / ValueError naming the argument, for any bad argument, here rather than
        at the first forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layers, Iterable) and not isinstance(layers, (str, list, tuple)):
        layers = list(layers)
    if isinstance(pool, str):
        check_choice(pool, "pool", POOLS)
    elif not callable(pool):
        raise TypeError(f"pool must be one of {POOLS} or a callable, got {pool!r}")
    if alpha is None and lam is None:
        alpha = 0.1
    _check_weights(alpha, lam)
    if not isinstance(keep_features, bool):
        raise TypeError(f"keep_features must be True or False, got {keep_features!r}")
    check_int(seed, "seed", minimum=-(2**63))
    check_int(accumulate, "accumulate")
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
    names = resolve_layers(model, layers)
    dims = _sketch_dims(model, names, sketch_dim)
    distinct = list(dict.fromkeys(dims))
    regularizers = [make_regularizer(variant, k, sketch=sketch, seed=seed,
                                     distributed=distributed, **variant_kwargs) for k in distinct]
    _warn_if_hooked(model, names)
    return SIGRegHandle(model, names, regularizers, pool, alpha, lam, keep_features,
                        accumulate, int(seed), compile, [distinct.index(k) for k in dims])


def _sketch_dims(model: nn.Module, names: list[str],
                 sketch_dim: int | None | Mapping[LayerSpec, int | None]) -> list[int | None]:
    """K of each regularized layer: ``sketch_dim`` itself, or the value of the first key of
    the mapping that matches the layer."""
    if not isinstance(sketch_dim, Mapping):
        return [sketch_dim] * len(names)
    if not sketch_dim:
        raise ValueError("sketch_dim is an empty mapping: give K, or {layer spec: K}")
    modules = dict(model.named_modules())
    dims, used = [], set()
    for name in names:
        key = next((k for k in sketch_dim if _matches(k, name, modules[name])), _MISSING)
        if key is _MISSING:
            raise ValueError(f"regularized layer {name!r} matches no key of sketch_dim "
                             f"{list(sketch_dim)}; add a '**' entry for the rest")
        dims.append(sketch_dim[key])
        used.add(key)
    unused = [k for k in sketch_dim if k not in used]
    if unused:
        raise ValueError(f"sketch_dim keys {unused} match none of the regularized layers {names}")
    return dims


_MISSING = object()


def _warn_if_hooked(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    again = [n for n in names if _HOOKED.get(modules[n], 0) > 0]
    if again:
        warnings.warn(
            f"layers {again} are already regularized by another SIGRegHandle (attach called "
            "twice?): both handles now add their regularizer. remove() the old handle first.",
            stacklevel=3,
        )


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
