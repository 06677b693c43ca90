"""Attach SIGReg to layers of any model with forward hooks: no change to the model's code.

    handle = sigreg.attach(model, "blocks.*", alpha=0.1)
    loss = handle.combine(criterion(model(x), y))      # (1 - 0.1) * task + 0.1 * reg
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ._checks import check_choice, check_flag, check_has_values, check_int
from ._projections import LayerProjections
from ._renamed import renamed_keywords
from .auto import AUTO, AutoWeight
from .capture import (
    POOLS,
    Call,
    LayerCapture,
    Pool,
    configure_dynamo,
    features_of,
    pool_output,
    takes_mask,
)
from .distributed import all_gather_layouts, cpu_group, plan_layers, use_distributed
from .functional import _check_weights, regularized_loss
from .modules import Regularizer, WeakSIGReg, make_regularizer

LayerSpec = str | type | Callable[[str, nn.Module], bool]


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

    Examples:
        >>> import sigreg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
        ...                       nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
        >>> sigreg.resolve_layers(model, nn.Linear)
        ['0', '2.0']
        >>> sigreg.resolve_layers(model, "*")        # one level of names
        ['0', '1', '2']
        >>> sigreg.resolve_layers(model, "2.**")     # "**" crosses dots
        ['2.0', '2.1']
        >>> sigreg.resolve_layers(model, lambda name, module: name.endswith("1"))
        ['1', '2.1']
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


def pool_features(output: Any, pool: Pool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Turn a layer's output into features (N, C).

    - tuple, list, dict (Hugging Face ``ModelOutput``) and dataclass outputs: their first
      floating-point tensor (integer and bool tensors are passed over); a PackedSequence:
      its real time steps. Unless ``pool`` is a callable, which receives the raw output
      (and ``mask=``, if it takes that keyword) and returns (N, C). Other outputs, and
      integer or bool ones, raise a TypeError (see :func:`sigreg.capture.layer_tensor`).
    - ``"mean"``: (N, C) as is; (B, T, C) mean over tokens (batch-first); (B, C, H, W) mean
      over H and W, (B, C, D, H, W) over D, H and W.
    - ``"flatten"``: (B, T, C) -> (B*T, C), every token a sample (language models).
    - ``"cls"``: (B, T, C) -> (B, C), the first token.

    ``mask``: (B, T), true (or 1) at real tokens, for (B, T, C) outputs: ``"mean"``
    averages the real tokens only, ``"flatten"`` keeps only them (N = their number).

    Examples:
        >>> import torch, sigreg
        >>> out = torch.randn(4, 10, 16)                  # (B, T, C)
        >>> sigreg.pool_features(out, "mean").shape
        torch.Size([4, 16])
        >>> sigreg.pool_features(out, "flatten").shape    # every token a sample
        torch.Size([40, 16])
        >>> sigreg.pool_features((out, None), "cls").shape   # a tuple: its first float tensor
        torch.Size([4, 16])
        >>> mask = torch.arange(10) < torch.tensor([[10], [7], [3], [5]])   # padding
        >>> sigreg.pool_features(out, "flatten", mask).shape   # the 25 real tokens
        torch.Size([25, 16])
    """
    features, token_mask = pool_output(output, pool, mask, takes_mask(pool))
    return features_of(Call(0, features, token_mask))


class _Part(NamedTuple):
    """The regularizer of some of a handle's layers (one per distinct K) and its (possibly
    compiled) loss."""

    regularizer: Regularizer
    compute: Callable

    @property
    def projections(self) -> LayerProjections:
        """The regularizer's projection stream, the one its own forward draws from."""
        return self.regularizer.projections


class _Entry(NamedTuple):
    """One call's features ready for the statistics: layer index, the pooled tensor (any
    shape whose reshape to (rows, width) is the features), rows N and width C."""

    layer: int
    features: torch.Tensor
    rows: int
    width: int


def _same_shape_and_dtype(group: list[_Entry]) -> list[torch.Tensor]:
    """The group's features, ready to stack: as they are when they match (the usual case,
    where keeping the pooled dimensions saves a kernel), else (rows, width) in float32."""
    first = group[0].features
    if all(e.features.shape == first.shape and e.features.dtype == first.dtype for e in group):
        return [e.features for e in group]
    return [e.features.reshape(e.rows, e.width).float() for e in group]


def _needing_grad(entry: _Entry, grad: bool) -> _Entry:
    """The entry, its features a leaf that requires grad if they do not and ``grad``."""
    if not grad or entry.features.requires_grad:
        return entry
    return entry._replace(features=entry.features.detach().requires_grad_())


def _pool_small_calls(passes: list[list[_Entry]]) -> list[_Entry]:
    """The entries of all passes; a layer's calls with fewer than 2 samples each, made in
    different passes (``accumulate=k`` forwards of a batch of one), become one entry, their
    samples pooled, where alone each would be left out."""
    entries = [e for p in passes for e in p]
    small: dict[int, list[tuple[int, _Entry]]] = {}
    for number, entries_of_pass in enumerate(passes):
        for e in entries_of_pass:
            if e.rows < 2:
                small.setdefault(e.layer, []).append((number, e))
    pooled = {layer: calls for layer, calls in small.items()
              if len({number for number, _ in calls}) > 1}
    if not pooled:
        return entries
    out, done = [], set()
    for e in entries:
        if e.layer not in pooled or e.rows >= 2:
            out.append(e)
        elif e.layer not in done:
            done.add(e.layer)
            calls = [c for _, c in pooled[e.layer]]
            features = torch.cat([c.features.reshape(c.rows, c.width) for c in calls])
            out.append(_Entry(e.layer, features, features.shape[0], e.width))
    return out


def _entries(calls: list[Call]) -> list[_Entry]:
    out, selected = [], {}
    for call in calls:
        if call.mask is not None:  # a padding mask: the samples it keeps, as (N, C)
            call = Call(call.layer, features_of(call, selected))
        rows = call.rows
        width = call.features.shape[-1] if rows == 0 else call.features.numel() // rows
        out.append(_Entry(call.layer, call.features, rows, width))
    return out


# Live handles per hooked module: attaching twice to a layer warns.
_HOOKED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


class SIGRegHandle:
    """The hooks placed by :func:`attach`, and the regularizer of the layers they see.

    The hooks (:class:`sigreg.capture.LayerCapture`) only pool each regularized layer's
    output and keep it; :meth:`loss` then computes the regularizer of every layer at once:
    calls stacked by (shape, dtype, device) into (L, N, C), one projection draw, one
    batched loss (one value per layer) and, under torch.distributed, one all-reduce per
    statistic, per group.

    A forward pass is a call of the model given to :func:`attach` in training mode with
    autograd on, or a training step's calls of its submodules (until a module that began
    one of them is called again); a submodule in eval mode inside a training model is
    still regularized. With the model in eval mode, under ``torch.no_grad()`` and inside a
    backward pass, where activation checkpointing recomputes layers, the hooks record
    nothing. A layer called
    several times in one pass contributes the mean of its calls; a layer not called is
    absent from that step's mean. :meth:`loss` covers the latest ``accumulate`` passes
    (default 1: the latest forward); more passes since the last :meth:`loss` raise an error
    there, and the hooks only ever keep that many, so a handle whose loss is never asked
    for holds one step's features at most.

    A layer whose samples in a step are too few for statistics (fewer than 2: a last batch
    of one; under torch.distributed, the global batch counts) is left out of that step with
    a warning (once per handle); when no layer is left, :meth:`loss` is 0 and
    :meth:`combine` returns the task loss unchanged.

    Examples:
        >>> import torch, sigreg
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
        >>> handle = sigreg.attach(model, nn.Linear, sketch_dim=4)
        >>> handle.names
        ['0', '2']
        >>> out = model(torch.randn(32, 8))      # a training forward: the hooks record
        >>> reg = handle.loss()                  # mean over the layers, differentiable
        >>> reg.requires_grad
        True
        >>> with torch.no_grad():
        ...     _ = model(torch.randn(32, 8))    # records nothing
        >>> _ = model(torch.randn(32, 8))
        >>> handle.clear()                       # drop a forward you train without SIGReg
        >>> sorted(handle.state_dict())          # the sketch stream, for checkpoints
        ['fixed', 'step']
        >>> handle.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        regularizers: Sequence[Regularizer],
        layer_parts: Sequence[int],
        *,
        pool: Pool,
        alpha: float | AutoWeight | None,
        lam: float | None,
        keep_features: bool = False,
        accumulate: int = 1,
        compile: bool | dict[str, Any] = False,
        distributed: bool | None = None,
    ) -> None:
        """Built by :func:`attach`: the ``model``'s layers ``names``, one regularizer per
        distinct K (each with the projection settings and seed), ``layer_parts[i]`` the index
        of layer i's (see ``sketch_dim`` of :func:`attach`); the keywords as there."""
        self.names = names
        self.regularizer = regularizers[0]  # the only one, unless K varies across layers
        self._layer_parts = list(layer_parts)
        self._parts = [_Part(r, _compiled(r.compute, compile)) for r in regularizers]
        for part in self._parts:  # layer i's fixed projection: from seed + i, saved by name
            part.projections.names = names
        self.pool = pool
        # alpha="auto": the weight sets itself (sigreg.auto); self.alpha is then "auto".
        self.auto: AutoWeight | None = alpha if isinstance(alpha, AutoWeight) else None
        self.alpha, self.lam = (AUTO if self.auto else alpha), lam
        self.keep_features = keep_features
        self.accumulate = accumulate
        self.distributed = distributed
        self._capture = LayerCapture(model, names, pool, accumulate)
        self._capture.measure = self.auto is not None
        self._dynamo_configured = configure_dynamo()
        self._averagings: dict[tuple, torch.Tensor] = {}
        self._last_names: list[str] = []
        self._last_values: torch.Tensor | None = None
        self._skipped = False  # the latest loss() had no layer to regularize
        self._warned: set[str] = set()
        self._meta_group: Any = None
        self._features: dict[str, torch.Tensor] = {}
        self._widths: dict[int, int] = {}  # each layer's feature width, to catch a bad layout
        self._sources: list[tuple[torch.Tensor, torch.Tensor]] = []  # alpha="auto"'s
        for m in self._capture.modules:
            _HOOKED[m] = _HOOKED.get(m, 0) + 1

    # ---- the padding mask of the next forward ---------------------------------------------

    def set_padding_mask(self, mask: torch.Tensor | Mapping[LayerSpec, torch.Tensor | None]
                         | None) -> None:
        """Pooling of the next training forward ignores padding: ``mask`` (B, T), true (or 1)
        at real tokens, e.g. a tokenizer's ``attention_mask``.

        ``pool="mean"`` averages each sequence's real tokens (a sequence with none is no
        sample), ``"flatten"`` keeps only real tokens as samples, a pool callable that takes
        a ``mask`` keyword receives it; ``"cls"`` and outputs that are not (B, T, C) ignore
        it. It applies to the next forward of the model (an eval one uses it up too) or,
        when the training step calls submodules instead, to the calls until :meth:`loss`;
        ``None`` clears it. The statistics of a padded batch equal those of the same tokens
        unpadded.

        Layers whose inputs are padded differently (an encoder-decoder's source and target)
        take a mapping from layer specs (names, globs, types, predicates, as ``layers``) to
        masks: each layer takes the mask of the first key that matches it, a layer that
        matches none (or whose mask is None) is pooled with all its tokens, e.g.
        ``{"encoder.**": src_mask, "decoder.**": tgt_mask}``. Every key must match a
        regularized layer.

        The mask stays out of a compiled model's graph (the calls it applies to are pooled
        when :meth:`loss` takes them), so padded lengths that vary do not recompile it.

        Raises:
            TypeError: a mask is not a (B, T) tensor.
            ValueError: a key of the mapping matches no regularized layer. (:meth:`loss`
                raises ValueError later if a regularized layer's output is (B', T', C) with
                (B', T') != (B, T).)
        """
        if isinstance(mask, Mapping):
            for value in mask.values():
                _check_mask_type(value)
            modules = dict(self._capture.model.named_modules())
            per_layer: dict[int, torch.Tensor] = {}
            used = set()
            for i, name in enumerate(self.names):
                key = next((k for k in mask if _matches(k, name, modules[name])), _MISSING)
                if key is not _MISSING:
                    used.add(key)
                    if mask[key] is not None:
                        per_layer[i] = mask[key]
            unused = [k for k in mask if k not in used]
            if unused:
                raise ValueError(f"padding mask keys {unused} match none of the regularized "
                                 f"layers {self.names}")
            self._capture.set_mask(per_layer or None)
            return
        _check_mask_type(mask)
        self._capture.set_mask(mask)

    # ---- the regularizer of all layers ----------------------------------------------------

    def loss(self) -> torch.Tensor:
        """Mean regularizer over the layers of the latest training forward pass (of the
        latest ``accumulate`` passes, each layer averaged over its calls).

        Consumes the recorded features: calling it again before another forward raises, as
        does calling it after more than ``accumulate`` forward passes. 0 (and
        :meth:`combine` returns the task loss) when no layer has samples enough.
        """
        if not self._dynamo_configured:
            self._dynamo_configured = configure_dynamo()
        if self.auto is not None:  # last step's gradients set this step's weight
            self.settle()
        entries = self._take_entries()
        if use_distributed(self.distributed):
            names, values = self._distributed_values(entries)
        else:
            names, values = self._local_values(entries)
        if self.auto is not None and names:
            self.auto.watch(self._sources)
        self._sources = []
        self._skipped = not names
        self._last_names, self._last_values = names, values.detach()
        if not names:
            return torch.zeros((), device=self._device(entries))
        return values.mean()

    def _take_entries(self) -> list[_Entry]:
        if self._capture.removed:
            raise RuntimeError("this handle was removed (handle.remove()): its hooks are gone; "
                               "attach() again to regularize")
        no_grad_forward = self._capture.no_grad_forward
        passes, forwards, no_grad = self._capture.take()
        # alpha="auto" measures at each pass's last regularized call: the one output whose
        # gradient holds no other regularized layer's term (none ran after it).
        lasts = [[c for c in p if isinstance(c, Call)][-1:] for p in passes]
        self._sources = [c[0].source for c in lasts if c and c[0].source is not None]
        if forwards > self.accumulate:
            raise RuntimeError(
                f"{forwards} training forward passes ran since the last loss(), but loss() "
                f"regularizes the latest {self.accumulate}: call loss() (or combine()) after "
                "every forward (with gradient accumulation too: once per micro-batch), "
                f"attach(..., accumulate={forwards}) to average forwards whose graphs are all "
                "still alive (several views, one backward), or handle.clear() to drop a "
                "forward you do not regularize. The recorded features were dropped."
            )
        if no_grad:
            raise RuntimeError(
                f"layers {[self.names[i] for i in sorted(no_grad)]} ran under torch.no_grad() "
                "inside a training forward, so their outputs cannot be regularized. Reentrant "
                "activation checkpointing does this: use torch.utils.checkpoint.checkpoint(..., "
                "use_reentrant=False) (Hugging Face: gradient_checkpointing_kwargs="
                "{'use_reentrant': False}); or do not attach to layers run without autograd."
            )
        if not passes:
            raise RuntimeError(self._no_forward_message(no_grad_forward))
        entries = _pool_small_calls([_entries(p) for p in passes])
        for e in entries:
            check_has_values(e.features, f"layer {self.names[e.layer]}'s features")
        if not entries:
            self._warn_once("none-called", "SIGReg: no regularized layer ran in this forward "
                            "(all skipped?): the step trains on the task loss alone.")
        elif torch.is_grad_enabled() and not any(e.features.requires_grad for e in entries):
            self._warn_once("no-gradient", (
                f"SIGReg: no gradient reaches the regularized layers "
                f"{sorted({self.names[e.layer] for e in entries})} (frozen, and their inputs "
                "do not require grad): the regularizer trains nothing. Regularize layers "
                "that train."))
        self._check_widths(entries)
        if self.keep_features:
            for e in entries:
                self._features[self.names[e.layer]] = e.features.detach().reshape(e.rows, -1)
        return entries

    def _no_forward_message(self, no_grad_forward: bool) -> str:
        message = ("no training-mode forward pass with autograd since the last loss() call: "
                   "run the model (model.train(), outside torch.no_grad()) first")
        if self._capture.replica_seen:
            return ("nn.DataParallel ran replicas of the attached model, which the hooks do not "
                    "regularize (and their features would be on several devices in one "
                    "process): use DistributedDataParallel, one process per GPU (global-batch "
                    "statistics, see docs/guide.md, 'Multi-GPU')")
        if no_grad_forward:
            message += (". The model did run in training mode under torch.no_grad(): reentrant "
                        "activation checkpointing around the whole model does this; use "
                        "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)")
        elif not self._capture.layer_seen:
            message += (". The hooks have never seen a regularized layer run since attach(): "
                        "if this model (or another of its class) was compiled and called "
                        "before sigreg was imported, its compiled code does not call hooks; "
                        "call torch.compiler.reset() once after attach()")
        return message

    def _check_widths(self, entries: list[_Entry]) -> None:
        """A layer's feature width never changes; when it does, the output was read with
        the wrong layout (channels or time steps taken for features)."""
        for e in entries:
            width = self._widths.setdefault(e.layer, e.width)
            if width != e.width:
                raise ValueError(
                    f"layer {self.names[e.layer]}'s pooled features changed width from {width} "
                    f"to {e.width}: its output is probably not laid out as pool={self.pool!r} "
                    "reads it ((B, T, C) tokens batch-first, (B, C, H, W) maps, (N, C)); give "
                    "pool=a callable that returns (N, C)")

    def clear(self) -> None:
        """Drop the features recorded since the last :meth:`loss` (e.g. a step trained
        without the regularizer)."""
        self._capture.clear()

    def _local_values(self, entries: list[_Entry]) -> tuple[list[str], torch.Tensor]:
        """Names of the layers called, and their regularizer values (L,) in that order."""
        groups: dict[tuple, list[_Entry]] = {}
        for e in entries:
            f = e.features
            key = (self._layer_parts[e.layer], tuple(f.shape), e.rows, f.dtype, f.device)
            groups.setdefault(key, []).append(e)
        kept = {}
        for key, group in groups.items():
            if group[0].rows < 2:
                self._warn_too_few([e.layer for e in group], group[0].rows)
            else:
                kept[key] = group
        return self._values([(key[0], group) for key, group in kept.items()])

    def _values(self, groups: list[tuple[int, list[_Entry]]]) -> tuple[list[str], torch.Tensor]:
        """The regularizer of each group (its part's index, entries of equal rows and width)
        computed as one stack, then the values averaged per layer: names of the layers and
        their values (L,), in first-call order."""
        values, order = [], []
        for ordinal, (part_index, group) in enumerate(groups):
            part = self._parts[part_index]
            z = torch.stack(_same_shape_and_dtype(group)).view(len(group), group[0].rows,
                                                               group[0].width)
            layers = tuple(e.layer for e in group)
            projection = part.projections.for_group(ordinal, layers, z)
            self._warn_full_covariance(part, layers, z.shape[-1], projection)
            values.append(part.compute(z, projection))
            order += layers
        for part in self._parts:
            part.projections.advance()
        if not values:
            return [], torch.zeros(0)
        flat = values[0] if len(values) == 1 else torch.cat([v.to(values[0].device) for v in values])
        layers = list(dict.fromkeys(order))
        if len(layers) < len(order):  # a layer called several times: the mean of its calls
            flat = self._averaging(tuple(order), flat.device, flat.dtype) @ flat
        return [self.names[i] for i in layers], flat

    def _distributed_values(self, entries: list[_Entry]) -> tuple[list[str], torch.Tensor]:
        """Like :meth:`_local_values`, with statistics over every rank: the ranks first
        exchange which layers they called (with widths and rows), so that every rank runs
        the same computations, and so the same collectives, in the same order. A layer's
        statistic is over the ranks that called it; where the layers differ across ranks,
        each is computed alone, with no rows on the ranks that did not call it."""
        layout = [(e.layer, e.width, e.rows) for e in entries]
        plan = plan_layers(all_gather_layouts(layout, self._layout_group()), self._layer_parts)
        if plan.too_few:
            self._warn_too_few(sorted({layer for layer, _ in plan.too_few}),
                               max(plan.too_few.values()), globally=True)
        mine: dict[tuple[int, int], _Entry] = {}  # (layer, its call number) -> entry
        for e in entries:
            mine[(e.layer, sum(key[0] == e.layer for key in mine))] = e
        device, groups = self._device(entries), []
        # Every rank's autograd graph must hold the same all-reduces, whose backward runs the
        # same collectives: a rank that did not call a layer takes part with no rows that
        # require grad, and features no gradient reaches on this rank (a frozen layer, an
        # input without grad) are made leaves that require it, when autograd is on.
        grad = torch.is_grad_enabled()
        for group in plan.groups:
            part = self._layer_parts[group.calls[0][0]]
            if group.stacked:
                groups.append((part, [_needing_grad(mine[key], grad) for key in group.calls]))
                continue
            for key in group.calls:  # one by one; where not called here, with no rows
                absent = _Entry(key[0], torch.zeros(0, group.width, device=device,
                                                    requires_grad=grad), 0, group.width)
                groups.append((part, [_needing_grad(mine.get(key, absent), grad)]))
        return self._values(groups)

    def _layout_group(self) -> Any:
        if self._meta_group is None:
            self._meta_group = cpu_group()
        return self._meta_group

    def _device(self, entries: list[_Entry]) -> torch.device:
        if entries:
            return entries[0].features.device
        params = [p for m in self._capture.modules for p in m.parameters()]
        return params[0].device if params else torch.device("cpu")

    def _warn_once(self, key: str, message: str) -> None:
        """Warn once per handle for each kind ``key``: a training loop repeats itself."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message + " Said once per handle.", stacklevel=5)

    def _warn_too_few(self, layers: list[int], rows: int, globally: bool = False) -> None:
        where = "the global batch of all ranks" if globally else "this step"
        names = [self.names[i] for i in dict.fromkeys(layers)]
        self._warn_once("too-few", (
            f"SIGReg: layers {names} have {rows} sample(s) in {where}, too few for "
            "statistics: they are left out of this step's regularizer (with none left, the "
            "step trains on the task loss alone). A last batch of one does this once; if "
            "every forward has fewer than 2 samples (a per-device batch of one), no step is "
            "ever regularized: raise the micro-batch, or attach(..., accumulate=k) and one "
            "loss() for k forwards, which pools their samples (their graphs stay alive "
            "until that loss's backward)."))

    def _warn_full_covariance(self, part: _Part, layers: tuple[int, ...], width: int,
                              projection: torch.Tensor | None) -> None:
        k = getattr(part.regularizer, "sketch_dim", None)
        if projection is None and isinstance(part.regularizer, WeakSIGReg) and k is not None:
            self._warn_once("full-covariance", (
                f"SIGReg: sketch_dim K={k} >= width {width} of layers "
                f"{[self.names[i] for i in layers]}: weak SIGReg uses their full {width} x "
                f"{width} covariance, no sketch (as the paper does when C <= K)."))

    def _averaging(self, order: tuple[int, ...], device, dtype) -> torch.Tensor:
        """(L, E) matrix averaging E call values into each of the L layers, first-call order."""
        key = (order, device, dtype)
        if key not in self._averagings:
            layers = list(dict.fromkeys(order))
            a = torch.tensor([[float(o == i) for o in order] for i in layers], dtype=dtype)
            self._averagings[key] = (a / a.sum(1, keepdim=True)).to(device)
        return self._averagings[key]

    def combine(self, task_loss: torch.Tensor) -> torch.Tensor:
        """Task loss plus regularizer with the weighting given to :func:`attach`; the task
        loss unchanged when no layer had samples enough (see the class docstring)."""
        reg = self.loss()
        if self._skipped:
            return task_loss
        return self.weigh(task_loss, reg)

    def weigh(self, task_loss: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
        """``task_loss`` and a regularizer value (:meth:`loss`'s) combined with this handle's
        weighting: ``(1 - alpha) * task + alpha * reg`` or ``task + lam * reg``; under
        ``alpha="auto"``, with the alpha in effect for this step (:attr:`weight`)."""
        if self.auto is not None:
            return self.auto.combine(task_loss, reg)
        return regularized_loss(task_loss, reg, alpha=self.alpha, lam=self.lam)

    @property
    def weight(self) -> torch.Tensor | float | None:
        """The alpha of the next :meth:`combine`: a 0-d tensor under ``alpha="auto"`` (no
        device sync; it changes at every :meth:`loss`), else the fixed alpha (None with
        ``lam``)."""
        return self.auto.alpha if self.auto is not None else self.alpha

    def settle(self) -> None:
        """``alpha="auto"``: fold the gradients measured by the latest backward into the
        weight now rather than at the next :meth:`loss` (which does it anyway). Under
        torch.distributed a collective, so every rank calls it at the same point: before
        a checkpoint, it makes the state saved by one rank everyone's. Nothing otherwise."""
        if self.auto is not None:
            self.auto.settle(use_distributed(self.distributed))

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
        """Detached pooled features (N, C) of the latest :meth:`loss` call's forward, per
        layer (needs ``keep_features=True``)."""
        return dict(self._features)

    # ---- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """State for exact checkpoint resume: the resample draw count and the fixed
        sketches drawn so far (CPU tensors); under ``alpha="auto"`` also the weight's state
        (``"auto"``, see :class:`sigreg.auto.AutoWeight`)."""
        states = [part.projections.state_dict() for part in self._parts]
        fixed = {name: t for state in states for name, t in state["fixed"].items()}
        out = {"step": states[0]["step"], "fixed": fixed}
        if self.auto is not None:
            out["auto"] = self.auto.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. Missing, unknown or mismatched entries raise a
        ValueError. Under ``alpha="auto"``, a state without ``"auto"`` (saved with a fixed
        alpha) starts the weight over; with a fixed alpha, an ``"auto"`` entry is ignored."""
        if not isinstance(state, dict) or not isinstance(state.get("fixed", {}), dict):
            raise TypeError("a handle state is a dict {'step': int, 'fixed': {layer: tensor}} "
                            "from state_dict()")
        auto = state.get("auto")
        state = {k: v for k, v in state.items() if k != "auto"}
        if self.auto is not None and auto is not None:
            self.auto.load_state_dict(auto)
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
        for m in self._capture.modules:
            _HOOKED[m] = _HOOKED.get(m, 1) - 1
        self._capture.remove()
        self._capture.modules = []
        self._features = {}

    def __deepcopy__(self, memo: dict) -> SIGRegHandle:
        raise TypeError(_NO_COPY)

    def __copy__(self) -> SIGRegHandle:
        raise TypeError(_NO_COPY)

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError(_NO_COPY.replace("copied", "copied or pickled") + "; save "
                        "handle.state_dict() to resume its sketches")

    def __enter__(self) -> SIGRegHandle:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        regularizers = ", ".join(repr(p.regularizer) for p in self._parts)
        return f"SIGRegHandle(layers={self.names}, regularizer={regularizers})"


_NO_COPY = ("a SIGRegHandle cannot be copied: its hooks belong to one model. attach() to "
            "the copy of the model instead")


def _compiled(fn: Callable, compile: bool | dict[str, Any]) -> Callable:
    """``fn`` itself, or ``torch.compile(fn, **options)`` (``compile=True``: torch's
    defaults, so a number of samples that varies, as padding masks make it, compiles a
    dynamic graph at its second value instead of one graph per value)."""
    if compile is False:
        return fn
    return torch.compile(fn, **({} if compile is True else dict(compile)))


@renamed_keywords(sketch="sketch_policy")
def attach(
    model: nn.Module,
    layers: LayerSpec | Iterable[LayerSpec],
    variant: str = "weak",
    sketch_dim: int | None | Mapping[LayerSpec, int | None] = 64,
    pool: Pool = "mean",
    *,
    sketch_policy: str = "resample",
    seed: int = 0,
    alpha: float | str | AutoWeight | None = None,
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
            (full covariance: ``sketch_dim``, ``sketch_policy`` and ``seed`` do not apply).
        sketch_dim: K, sketch width (weak) or number of directions (strong), an
            integer of at least 1. Weak: None or K >= C means the full covariance. A mapping from layer specs
            to K sets it per layer: each layer takes the value of the first key that matches
            it (``{"blocks.0": 16, "**": 64}``); every layer must match a key and every key a
            layer. Layers with different K are computed in separate groups.
        pool: how outputs become (N, C); see :func:`pool_features`.
        sketch_policy: ``"resample"`` (a fresh projection per layer every
            :meth:`~SIGRegHandle.loss`, all of a group drawn at once from (seed, step)) or
            ``"fixed"`` (layer i's drawn once from ``seed + i``); see :mod:`sigreg.modules`.
            ``sketch=``, its old name, is deprecated.
        seed: seed of the projection stream. Use the same seed on every rank.
        alpha: weighting used by :meth:`SIGRegHandle.combine`:
            ``(1 - alpha) * task + alpha * reg``. Default (neither given): alpha=0.1.
            ``alpha="auto"`` (or a :class:`sigreg.auto.AutoWeight` with other constants):
            the weight starts at 0.1 and rises (to at most 0.5) while the regularizer's
            gradient grows the last regularized layer's features and they are below unit
            power (a dead layer), falling back to 0.1 otherwise; see :mod:`sigreg.auto`.
            Use it with ``scale_invariant=True`` (weak). The regularized layers must run
            eagerly (a tensor hook reads that gradient).
        lam: the other weighting, ``task + lam * reg``, instead of ``alpha``.
        distributed: global-batch statistics under torch.distributed (None: automatic).
        keep_features: keep the latest pooled features for diagnostics.
        accumulate: forward passes one :meth:`~SIGRegHandle.loss` averages (gradient
            accumulation, several views); 1: the latest forward only. A layer's calls of
            fewer than 2 samples in different forwards (micro-batches of one) are pooled
            into one set of samples instead: alone, each would be left out.
        compile: ``True`` (or a dict of ``torch.compile`` options) compiles the batched
            regularizer; the projection draws stay eager. The hooks need nothing: a
            compiled model traces them into its graph (``fullgraph=True`` too); attach
            before the compiled model's first call (see :meth:`SIGRegHandle.loss`'s error).
        variant_kwargs: strong: ``t_max`` (half-width of [-t_max, t_max], default 3) and
            ``num_points`` (trapezoid nodes on [0, t_max] only, default 17; the paper's
            code's 17 points on [-5, 5] are ``t_max=5, num_points=9``); vicreg: ``gamma``,
            ``var_weight``, ``cov_weight``, ``eps``; weak: ``scale_invariant`` (see
            :func:`sigreg.weak_sigreg`).

    Returns:
        SIGRegHandle: ``handle.loss()``, ``handle.combine(task)``,
        ``handle.layer_losses()``, ``handle.remove()``.

    Raises:
        TypeError: an argument of the wrong type, named, here rather than at the first
            forward.
        ValueError: an argument out of range (or a layer spec matching nothing), named.

    Examples:
        >>> import torch, sigreg
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        ...                       nn.Linear(32, 2))
        >>> handle = sigreg.attach(model, ["0", "2"], sketch_dim=16)   # weak, alpha = 0.1
        >>> x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
        >>> task = nn.functional.cross_entropy(model(x), y)
        >>> loss = handle.combine(task)          # 0.9 * task + 0.1 * mean over the layers
        >>> loss.backward()
        >>> {name: round(value, 2) for name, value in handle.layer_losses().items()}
        {'0': 3.71, '2': 3.84}
        >>> handle.remove()                      # the model is a plain model again
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
    if isinstance(alpha, str) and alpha == AUTO:
        alpha = AutoWeight()
    if isinstance(alpha, AutoWeight):
        if lam is not None:
            raise ValueError("give exactly one of alpha= ((1-a)*task + a*reg) or lam= "
                             "(task + l*reg)")
    else:
        if isinstance(alpha, str):
            raise TypeError(f"alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
        _check_weights(alpha, lam)
    check_flag(keep_features, "keep_features")
    check_int(seed, "seed", minimum=-(2**63))
    check_int(accumulate, "accumulate")
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
    names = resolve_layers(model, layers)
    dims = _sketch_dims(model, names, sketch_dim)
    distinct = list(dict.fromkeys(dims))
    regularizers = [make_regularizer(variant, k, sketch_policy=sketch_policy, seed=seed,
                                     distributed=distributed, **variant_kwargs) for k in distinct]
    _warn_if_hooked(model, names)
    return SIGRegHandle(model, names, regularizers, [distinct.index(k) for k in dims],
                        pool=pool, alpha=alpha, lam=lam, keep_features=keep_features,
                        accumulate=accumulate, compile=compile,
                        distributed=distributed)


def _sketch_dims(model: nn.Module, names: list[str],
                 sketch_dim: int | None | Mapping[LayerSpec, int | None]) -> list[int | None]:
    """K of each regularized layer: ``sketch_dim`` itself, or the value of the first key of
    the mapping that matches the layer."""
    if not isinstance(sketch_dim, Mapping):
        return [sketch_dim] * len(names)
    if not sketch_dim:
        raise ValueError("sketch_dim is an empty mapping: give K, or {layer spec: K}")
    for key in sketch_dim:
        if not isinstance(key, (str, type)) and not callable(key):
            raise TypeError(f"sketch_dim's keys are layer specs (a name, glob, module type or "
                            f"predicate), as in {{'blocks.0': 16, '**': 64}}; got the key {key!r}")
    modules = dict(model.named_modules())
    taken: dict[str, Any] = {}  # layer name: the key whose K it takes (the first that matches)
    for name in names:
        key = next((k for k in sketch_dim if _matches(k, name, modules[name])), _MISSING)
        if key is _MISSING:
            raise ValueError(f"regularized layer {name!r} matches no key of sketch_dim "
                             f"{list(sketch_dim)}; add a '**' entry for the rest")
        taken[name] = key
    unused = [k for k in sketch_dim if k not in taken.values()]
    for key in unused:  # one that matches layers is shadowed by an earlier key
        shadowed = [n for n in names if _matches(key, n, modules[n])]
        if shadowed:
            earlier = ", ".join(map(repr, dict.fromkeys(taken[n] for n in shadowed)))
            raise ValueError(
                f"sketch_dim key {key!r} matches {shadowed}, but each layer takes the first key "
                f"that matches it, and {earlier} comes first: put {key!r} before {earlier}")
    if unused:
        raise ValueError(f"sketch_dim keys {unused} match none of the regularized layers {names}")
    return [sketch_dim[taken[name]] for name in names]


_MISSING = object()


def _check_mask_type(mask: Any) -> None:
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"the padding mask must be a (B, T) tensor or None (or a mapping from "
                        f"layer specs to them), got {shape}")


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

    Examples:
        >>> import torch, sigreg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
        >>> recorder = sigreg.FeatureRecorder(model, nn.Linear)
        >>> with recorder.recording(), torch.no_grad():
        ...     _ = model(torch.randn(32, 8))
        >>> {name: tuple(f.shape) for name, f in recorder.features.items()}
        {'0': (32, 16), '2': (32, 4)}
        >>> recorder.remove()
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
        # Traced by torch.compile like the handle's hooks: `active` is a flag dynamo guards
        # on, so a compiled model has one graph with recording and one without.
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
