"""Recording what regularized layers output during training forwards, with hooks that
``torch.compile`` traces into the model's graph.

:class:`LayerCapture` owns the hooks of one :func:`sigreg.attach` handle. A *pass* is one
training forward of the model given to ``attach`` (training mode, autograd on); the hooks
pool each regularized layer's output and append it to the pass. The handle takes the
passes at every ``loss()``.

Why the hooks look the way they do:

- They only read flags and append to lists: dynamo traces such hooks into the model's
  graph (no graph break, ``fullgraph=True`` works) and, since the lists are emptied by
  every ``loss()``, every step sees the same state and nothing recompiles. A Python
  counter mutated in a hook would be guarded on and recompile every step.
- They are small objects that check ``module is <the module attached to>``: ``copy.deepcopy``
  of an attached model (an EMA teacher, ``AveragedModel``) shares them, so the copy's
  hooks find another module and do nothing; pickling the model (``torch.save(model)``)
  stores a hook that does nothing.
- A pass opens at the model's forward pre-hook and closes at its forward hook (a call of
  the model inside one, as Lightning's DDP wrapper makes, belongs to it; a forward that
  raises drops its pass). Activation checkpointing recomputes layers inside backward,
  after the model's forward returned: those calls find no open pass and are ignored. A
  layer called while no pass is open (a training step that calls ``model.encoder`` rather
  than ``model``) opens one itself, unless autograd is running a backward pass.
- An in-place op after a layer (``ReLU(inplace=True)``) changes an output kept as it is (or
  a view of it): eager mode notes the kept tensor's version counter and ``take()`` raises
  when it moved; a compiled graph has no counters, so there the hook keeps a copy, which
  inductor removes where nothing changes the output in place.
- Reentrant checkpointing (``use_reentrant=True``) runs its region under ``no_grad``,
  where an output cannot be regularized: such calls are noted, and a layer that only ran
  that way makes ``loss()`` raise an error naming the fix.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils.module_tracker import ModuleTracker

Pool = str | Callable[..., torch.Tensor]
POOLS = ("mean", "flatten", "cls")

# Its ``is_bw`` says whether autograd is running a backward pass (the public form of that
# question). Never entered as a context: it tracks nothing.
_BACKWARD = ModuleTracker()

# torch.nn layers whose (N, C, L) outputs put channels before positions, and those whose
# 3-D outputs are sequence-first unless built with batch_first=True.
_CHANNELS_FIRST = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d,
                   nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveMaxPool1d, nn.AdaptiveAvgPool1d)
_MAY_BE_SEQUENCE_FIRST = (nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer,
                          nn.TransformerDecoderLayer, nn.TransformerEncoder,
                          nn.TransformerDecoder)


def configure_dynamo() -> bool:
    """Settings torch.compile needs to run the hooks as eager code does; whether they are
    set (called by :func:`sigreg.attach` and, until then, by every ``loss()``).

    - ``skip_nnmodule_hook_guards = False``: dynamo checks modules' hooks, so code compiled
      before ``attach`` (or for another instance of the same class, e.g. the un-attached
      arm of a comparison) recompiles instead of running without them. A guard per hooked
      module per compiled call; changing hooks recompiles. Code compiled before these
      settings has no such guards: it is dropped then (``torch.compiler.reset()``), and
      recompiles at its next call.
    - ``skip_fwd_side_effects_in_bwd_under_checkpoint = True``: a compiled model whose
      attached layers sit inside ``checkpoint(..., use_reentrant=False)`` compiles (dynamo
      otherwise refuses the hooks' appends there and runs the model eagerly), and the
      recomputation in backward does not record again, as in eager mode.

    Not while a process group exists and torch._dynamo is not imported yet: importing it
    then makes torch keep the group alive past ``destroy_process_group()``, and a rank can
    abort at exit ("terminate called without an active exception", torch 2.13). Then the
    settings wait until something else imports dynamo (``torch.compile`` does).
    """
    if "torch._dynamo" not in sys.modules and dist.is_available() and dist.is_initialized():
        return False
    import torch._dynamo  # here, not at import: it is slow to import

    config = torch._dynamo.config
    if config.skip_nnmodule_hook_guards:
        config.skip_nnmodule_hook_guards = False
        torch.compiler.reset()
    config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return True


def in_backward() -> bool:
    """True while autograd runs a backward pass outside compiled code (where activation
    checkpointing reruns layers); compiled code never runs Python hooks there."""
    return not torch.compiler.is_compiling() and _BACKWARD.is_bw


def _exporting() -> bool:
    """torch.export traces the model (with fake tensors): not a training forward."""
    return torch.compiler.is_exporting()


class Call(NamedTuple):
    """One training call of a regularized layer: the layer's index, its pooled output
    (``rows`` samples of C features once reshaped) and the (B, T) padding mask whose
    samples are still to select (None without a mask); see :func:`features_of`. A call
    recorded under a padding mask holds the layer's output tensor instead (``masked``): it
    is pooled with the mask when the passes are taken, outside any compiled graph, so that a
    compiled model does not specialise on the mask's length. ``version``: the ``_version``
    of the kept tensor when recorded (eager mode), to catch an in-place op that changed it
    after the layer ran (None: nothing to check)."""

    layer: int
    features: Any
    mask: torch.Tensor | None = None
    masked: bool = False
    version: int | None = None
    source: tuple[torch.Tensor, torch.Tensor] | None = None  # (output, its view), measured

    @property
    def rows(self) -> int:
        """Samples N: B, or B * T for a (B, T, C) output taken token by token."""
        f = self.features
        if self.mask is not None:
            raise RuntimeError("a masked call's rows are known once its samples are selected")
        return f.shape[0] * f.shape[1] if f.dim() == 3 else f.shape[0]


def layout(module: nn.Module) -> str:
    """How a module's 3-D output is laid out: ``"batch_first"`` (B, T, C), the convention;
    ``"channels_first"`` (B, C, L) for 1-D convolutions, norms and pools; ``"sequence_first"``
    (T, B, C) for recurrent and transformer layers built with ``batch_first=False``."""
    if isinstance(module, _CHANNELS_FIRST):
        return "channels_first"
    if isinstance(module, _MAY_BE_SEQUENCE_FIRST):
        inner = module
        if isinstance(inner, (nn.TransformerEncoder, nn.TransformerDecoder)):
            inner = inner.layers[0]
        if isinstance(inner, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            inner = inner.self_attn
        return "batch_first" if getattr(inner, "batch_first", True) else "sequence_first"
    return "batch_first"


def layer_tensor(output: Any, name: str | None = None) -> torch.Tensor | PackedSequence:
    """The part of a layer's output that a named pool reads: the output itself when it is a
    tensor or a PackedSequence, else the first floating-point tensor (or PackedSequence) of
    a tuple or list, of a dict's values (a Hugging Face ``ModelOutput``: its fields that are
    not None) or of a dataclass's fields, in order; integer and bool tensors (indices,
    codes, masks) are passed over there.

    Raises:
        TypeError naming the layer, if the output is an integer or bool tensor or holds no
        floating-point tensor: a pool callable reads such outputs.
    """
    if isinstance(output, (torch.Tensor, PackedSequence)):
        x = output
    else:
        if isinstance(output, (tuple, list)):
            items = list(output)
        elif isinstance(output, Mapping):
            items = list(output.values())
        elif dataclasses.is_dataclass(output) and not isinstance(output, type):
            items = [getattr(output, f.name) for f in dataclasses.fields(output)]
        else:
            raise TypeError(f"{_layer(name)} returned a {type(output).__name__}, which a named "
                            "pool cannot read (it reads a tensor, or the first floating-point "
                            "tensor of a tuple, list, dict or dataclass): "
                            f"{_CALLABLE_HINT}")
        x = None
        for item in items:
            if isinstance(item, PackedSequence) or (isinstance(item, torch.Tensor)
                                                    and item.is_floating_point()):
                x = item
                break
        if x is None:
            raise TypeError(f"{_layer(name)} returned a {type(output).__name__} with no "
                            "floating-point tensor in it (a named pool takes the first one): "
                            f"{_CALLABLE_HINT}")
    if isinstance(x, torch.Tensor) and not x.is_floating_point():
        raise TypeError(f"{_layer(name)}'s output is a {x.dtype} tensor: integer and bool "
                        "values (indices, codes, masks) are not features to regularize. "
                        "Regularize a layer whose output is floating-point, or "
                        f"{_CALLABLE_HINT}")
    return x


_CALLABLE_HINT = "give attach(..., pool=) a callable that returns the features (N, C) from it"


def _layer(name: str | None) -> str:
    return "a layer" if name is None else f"layer {name!r}"


def pool_output(output: Any, pool: Pool, mask: torch.Tensor | None = None,
                pool_takes_mask: bool = False, module: nn.Module | None = None,
                name: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's output pooled for the statistics, keeping the pooled dimensions, and the
    padding mask still to apply (selecting samples: their number depends on the data, so
    it happens later, outside a compiled graph).

    ``mask``: (B, T), true (or nonzero) at real tokens, applied to batch-first (B, T, C)
    outputs only. ``module``: the layer, whose type says how a 3-D output is laid out (see
    :func:`layout`); ``name``: its name, for errors. Keeping the pooled dimensions makes the
    pooling's backward one kernel fewer (no unsqueeze), which counts on a GPU where every
    layer's hooks are launch-bound. What a named pool reads: :func:`layer_tensor`.
    """
    if callable(pool):
        x = pool(output, mask=mask) if pool_takes_mask else pool(output)
        if not (isinstance(x, torch.Tensor) and x.dim() == 2):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"a pool callable must return features (N, C), got {shape}"
                             + ("" if name is None else f" for layer {name!r}"))
        return x, None
    x = layer_tensor(output, name)
    if isinstance(x, PackedSequence):  # its data are the real time steps of every sequence
        return _pool_packed(x, pool), None
    if x.dim() != 3:
        if x.dim() == 2:
            return x, None
        if pool == "mean" and x.dim() >= 4:  # (B, C, *spatial): conv maps, video
            return x.mean(tuple(range(2, x.dim())), keepdim=True), None
        raise ValueError(f"pool={pool!r} cannot turn {_layer(name)}'s output of shape "
                         f"{tuple(x.shape)} into features (N, C): {_CALLABLE_HINT}")
    order = "batch_first" if module is None else layout(module)
    if order != "batch_first":
        if mask is not None:
            raise ValueError(f"a padding mask needs batch-first (B, T, C) outputs; "
                             f"{type(module).__name__} gives {order.replace('_', '-')} ones")
        x = x.transpose(1, 2) if order == "channels_first" else x.transpose(0, 1)
    if mask is not None and pool != "cls":
        _check_mask(mask, x)
        if pool == "flatten":
            return x, mask
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
        return pooled, mask  # a sequence with no real token is no sample: see features_of
    if pool == "mean":
        return x.mean(1, keepdim=True), None
    if pool == "flatten":
        return x, None
    return x[:, :1], None  # "cls"


def _pool_packed(x: PackedSequence, pool: str) -> torch.Tensor:
    """A packed batch's features: every real time step (``"flatten"``), each sequence's
    first step (``"cls"``) or the mean of its steps (``"mean"``); the padding mask does not
    apply (a packed batch has no padding)."""
    if pool == "flatten":
        return x.data
    if pool == "cls":
        return x.data[:int(x.batch_sizes[0])]
    padded, lengths = pad_packed_sequence(x, batch_first=True)
    return padded.sum(1) / lengths.to(padded.device, padded.dtype).unsqueeze(1)


def aliases_output(pool: Pool, features: Any) -> bool:
    """Whether what a hook keeps may be the layer's output itself or a view of it (so that
    an in-place op after the layer changes it): everything but a named pool's reductions
    (token, spatial and packed means)."""
    if callable(pool) or not isinstance(features, torch.Tensor):
        return True
    return pool != "mean" or features.dim() == 2


def _check_mask(mask: torch.Tensor, x: torch.Tensor) -> None:
    if mask.shape != x.shape[:2]:
        raise ValueError(f"the padding mask has shape {tuple(mask.shape)}, but a regularized "
                         f"layer's output is {tuple(x.shape)}: the mask must be (B, T) = "
                         f"{tuple(x.shape[:2])}, true at real tokens")


def features_of(call: Call, selected: dict[tuple, torch.Tensor] | None = None) -> torch.Tensor:
    """The call's features (N, C), every sample a row; with a padding mask, only the real
    tokens (``"flatten"``: (B, T, C) features) or the sequences that have one (``"mean"``:
    (B, 1, C)). ``selected`` caches each mask's indices (by ``id``): one device sync per
    mask and kind, not per layer."""
    f, mask = call.features, call.mask
    if mask is None:
        return f.reshape(call.rows, -1)
    tokens = f.shape[:2] == mask.shape
    key = (id(mask), tokens)
    selected = {} if selected is None else selected
    if key not in selected:
        keep = mask.reshape(-1) if tokens else mask.any(1)
        selected[key] = keep.nonzero().squeeze(1)
    return f.reshape(-1, f.shape[-1]).index_select(0, selected[key])


def takes_mask(pool: Pool) -> bool:
    """Whether a pool callable accepts a ``mask`` keyword (then it gets the padding mask)."""
    if not callable(pool):
        return False
    try:
        return "mask" in inspect.signature(pool).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def _ancestors(modules: dict[str, nn.Module], names: list[str]) -> list[nn.Module]:
    """The modules between the model and the layers ``names``, the layers included: every
    module a training step may call instead of the model (each once)."""
    found: dict[int, nn.Module] = {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            module = modules.get(".".join(parts[:i]))
            if module is not None:
                found.setdefault(id(module), module)
    return list(found.values())


def _inert(*args: Any) -> None:
    """What a hook becomes when the model is pickled: nothing."""


MASKED = "masked"  # the first item of a pass made under a padding mask


class _Hook:
    """A hook of a capture. ``copy.deepcopy`` (of the model holding it) shares it, so a
    copy's module is never the one attached to; pickling stores :func:`_inert`."""

    def __init__(self, capture: LayerCapture) -> None:
        self.capture = capture

    def __deepcopy__(self, memo: dict) -> _Hook:
        return self

    def __reduce__(self) -> tuple:
        return (_inert_hook, ())


def _inert_hook() -> Callable:
    return _inert


class _PassStart(_Hook):
    def __call__(self, module: nn.Module, args: Any) -> None:
        c = self.capture
        if module is not c.model:
            c.replica_seen = c.replica_seen or getattr(module, "_is_replica", False)
            return
        if not module.training or in_backward() or _exporting():
            return
        if not torch.is_grad_enabled():
            c.no_grad_forward = True  # for the error if nothing is recorded
            return
        if not c.depth:  # a call inside a call of the model is the same pass
            c.new_pass()
        c.depth += 1


class _PassEnd(_Hook):
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        c = self.capture
        if module is not c.model:
            return
        if c.depth:
            c.depth -= 1
            # Called with no output from torch's `except` when the forward raised (a
            # skipped bad batch, an OOM): its partial pass is not a forward to regularize.
            if not c.depth and output is None and sys.exc_info()[0] is not None and c.passes:
                c.passes.pop()
        if not c.depth:
            c.masked = False  # the mask was this forward's (an eval one's too)


class _IndexedHook(_Hook):
    """A hook of one of the capture's modules, by index."""

    def __init__(self, capture: LayerCapture, index: int) -> None:
        super().__init__(capture)
        self.index = index


class _SubmoduleStart(_IndexedHook):
    """A call of a module between the model and a regularized layer (or of the layer), made
    while no forward of the model runs: a training step that calls ``model.backbone(x)``.
    The outermost such call joins the open pass, unless the same module already began a
    call in it: then it is the next step's, and opens a new pass."""

    def __call__(self, module: nn.Module, args: Any) -> None:
        c = self.capture
        if (module is not c.ancestors[self.index] or c.depth or not c.model.training
                or in_backward() or _exporting()):
            return
        if not torch.is_grad_enabled():
            return
        if not c.entered:  # the outermost call
            if not c.passes or self.index in c.entries:
                c.new_pass()
            c.entries.append(self.index)
        c.entered.append(self.index)


class _SubmoduleEnd(_IndexedHook):
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        c = self.capture
        if module is not c.ancestors[self.index] or not c.entered or c.entered[-1] != self.index:
            return
        c.entered.pop()
        # The outermost call raised (a skipped bad batch): the pass it opened is dropped.
        if (not c.entered and output is None and sys.exc_info()[0] is not None and c.passes
                and c.entries == [self.index]):
            c.passes.pop()
            c.entries = []


class _LayerCall(_IndexedHook):
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        c = self.capture
        # Training or not is the attached model's mode, not the layer's: a submodule put in
        # eval mode to freeze its BatchNorm statistics still trains its weights.
        if module is not c.modules[self.index] or not c.model.training or _exporting():
            return
        if not torch.is_grad_enabled():
            # Inside a training forward or step: reentrant checkpointing (its region runs
            # under no_grad, and again in backward) or a no_grad target; see take().
            if c.depth or not in_backward():
                c.no_grad_layers.add(self.index)
                c.no_grad_forward = True
            return
        if not c.depth:
            if in_backward():
                return  # recomputed by activation checkpointing
            if not c.passes:
                c.new_pass()
        source = None
        if c.measure:  # the regularizer reads a view: its gradient is told apart (sigreg.auto)
            output, source = _viewed(output)
        name = c.names[self.index]
        if c.masked:  # the output tensor (a callable's: the output), pooled at take()
            features = output if callable(c.pool) else layer_tensor(output, name)
        else:
            features = pool_output(output, c.pool, None, c.pool_takes_mask, module, name)[0]
        # An in-place op after the layer (ReLU(inplace=True), x.add_()) would change a kept
        # output or view: eager mode notes its version, checked at take(); a compiled graph
        # has no versions to read, so it keeps a copy (inductor removes the copy where
        # nothing changes the output in place: no extra memory or kernel there).
        version = None
        if c.masked or aliases_output(c.pool, features):
            if torch.compiler.is_compiling():
                features = _copied(features)
            else:
                version = _version_of(features)
        c.passes[-1].append(Call(self.index, features, masked=c.masked, version=version,
                                 source=source))
        c.layer_seen = True


def _copied(features: Any) -> Any:
    """A copy inside a compiled graph. ``clone().view(shape)``: inductor drops the copy
    where the output is not changed in place (the same kernels and buffers as without it),
    and a bare clone next to a user's ``output.detach().clone()`` hook made inductor's
    backward fail (torch 2.13: "expected Tensor() for op: input")."""
    def copy(x: torch.Tensor) -> torch.Tensor:
        return x.clone().view(x.shape)

    if isinstance(features, torch.Tensor):
        return copy(features)
    return torch.utils._pytree.tree_map_only(torch.Tensor, copy, features)


def _version_of(features: Any) -> int | None:
    """The version counter of the tensor kept (of a raw output's first floating-point
    tensor); a view shares its base's counter."""
    if isinstance(features, torch.Tensor):
        return features._version
    try:
        x = layer_tensor(features)
    except TypeError:
        return None
    return (x.data if isinstance(x, PackedSequence) else x)._version


def _viewed(output: Any) -> tuple[Any, tuple[torch.Tensor, torch.Tensor] | None]:
    """``output`` with its tensor (the first element of a tuple or list) replaced by a view
    of it, and (tensor, view); ``output`` and None when there is no such tensor."""
    x = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(x, torch.Tensor) or not x.requires_grad:
        return output, None
    view = x.view_as(x)
    if x is output:
        return view, (x, view)
    return type(output)([view, *output[1:]]) if isinstance(output, list) else \
        (view, *output[1:]), (x, view)


class LayerCapture:
    """The hooks of one handle and the passes they recorded since the last :meth:`take`.

    Keeps at most ``accumulate`` passes (older ones are dropped and counted), so a handle
    whose loss is never asked for holds that many forwards' features at most.
    """

    def __init__(self, model: nn.Module, names: list[str], pool: Pool, accumulate: int) -> None:
        modules = dict(model.named_modules())
        self.model = model
        self.names = names
        self.modules = [modules[n] for n in names]
        self.pool = pool
        self.pool_takes_mask = takes_mask(pool)
        self.accumulate = accumulate
        self.passes: list[list[Call]] = []
        self.no_grad_layers: set[int] = set()  # layers called under no_grad in a pass
        self.no_grad_forward = False  # the model ran in training mode under no_grad
        self.dropped = 0  # passes dropped beyond `accumulate`
        # Padding masks, kept out of the hooks (see Call): masks[i] is the i-th masked pass's
        # (its list starts with MASKED); `masked` says whether the next forward has one.
        self.masks: list[torch.Tensor | dict[int, torch.Tensor]] = []
        self.masked = False
        self.mask: torch.Tensor | dict | None = None  # the latest one set (submodule steps reuse it)
        self.depth = 0  # calls of the model running (a wrapper may re-enter it: Lightning)
        # Steps that call submodules (see _SubmoduleStart): the modules whose outermost calls
        # made the open pass, and the stack of those running.
        self.entries: list[int] = []
        self.entered: list[int] = []
        self.layer_seen = False  # a layer call was ever recorded (for the error if none)
        self.replica_seen = False  # nn.DataParallel ran a replica of the model (not hooked)
        self.removed = False
        self.measure = False  # pool from a view of each output (alpha="auto")
        self._handles = [model.register_forward_pre_hook(_PassStart(self)),
                         model.register_forward_hook(_PassEnd(self), always_call=True)]
        self._handles += [m.register_forward_hook(_LayerCall(self, i))
                          for i, m in enumerate(self.modules)]
        self.ancestors = _ancestors(modules, names)
        for i, m in enumerate(self.ancestors):
            self._handles += [m.register_forward_pre_hook(_SubmoduleStart(self, i)),
                              m.register_forward_hook(_SubmoduleEnd(self, i), always_call=True)]

    def new_pass(self) -> None:
        if len(self.passes) >= self.accumulate:
            if self.passes.pop(0)[:1] == [MASKED]:
                self.masks = self.masks[1:]
            self.dropped += 1
        self.passes.append([MASKED] if self.masked else [])
        self.entries = []

    def set_mask(self, mask: torch.Tensor | dict[int, torch.Tensor] | None) -> None:
        """The padding mask of the next forward, or one per layer index (layers absent from
        the dict take none); a mask no forward used is dropped."""
        used = sum(p[:1] == [MASKED] for p in self.passes)
        self.masks = [*self.masks[:used], *([] if mask is None else [mask])]
        self.masked, self.mask = mask is not None, mask

    def take(self) -> tuple[list[list[Call]], int, set[int]]:
        """The recorded passes (calls made under a padding mask pooled with it now), the
        number of forwards they came from (dropped ones included) and the layers called
        only under no_grad in them; then empty.

        Raises:
            RuntimeError naming the layer if a kept output was changed in place after its
            layer ran (the passes are dropped).
        """
        passes, forwards, masks = self.passes, len(self.passes) + self.dropped, iter(self.masks)
        no_grad = self.no_grad_layers - {c.layer for p in passes for c in p if c is not MASKED}
        latest_mask = self.mask  # a submodule step's passes after the first reuse it
        self.clear()
        for call in (c for p in passes for c in p if c is not MASKED):
            if call.version is not None and _version_of(call.features) != call.version:
                raise RuntimeError(
                    f"layer {self.names[call.layer]!r}'s output was modified in place after "
                    "the layer returned it (an in-place op such as nn.ReLU(inplace=True), "
                    "F.relu_, x.add_(...), in-place dropout), so its features would be the "
                    "modified values. Make that op out-of-place (inplace=False), regularize "
                    "the module that ends with it instead, or give attach(..., pool=) a "
                    "callable that returns a copy (e.g. lambda out: out.clone()). The "
                    "recorded features were dropped.")
        return [self._pooled(p[1:], next(masks, latest_mask)) if p[:1] == [MASKED] else p
                for p in passes], forwards, no_grad

    def _pooled(self, calls: list[Call], mask: torch.Tensor | dict[int, torch.Tensor]
                ) -> list[Call]:
        return [Call(c.layer, *pool_output(c.features, self.pool,
                                           mask.get(c.layer) if isinstance(mask, dict) else mask,
                                           self.pool_takes_mask, self.modules[c.layer],
                                           self.names[c.layer]), source=c.source)
                for c in calls]

    def clear(self) -> None:
        """Drop what was recorded, and the padding masks. New lists rather than .clear(): a
        list taken by :meth:`take` stays intact."""
        self.passes, self.no_grad_layers, self.dropped = [], set(), 0
        self.no_grad_forward, self.masks, self.masked, self.depth = False, [], False, 0
        self.mask, self.entries, self.entered = None, [], []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
        self.removed = True
