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
- They are closures over the capture and check ``module is <the module attached to>``:
  ``copy.deepcopy`` of an attached model (an EMA teacher, ``AveragedModel``) copies the
  closures but not the capture, so the copy's hooks find another module and do nothing.
- A pass opens at the model's forward pre-hook and closes at its forward hook (a call of
  the model inside one, as Lightning's DDP wrapper makes, belongs to it). Activation
  checkpointing recomputes layers inside backward, after the model's forward returned:
  those calls find no open pass and are ignored. A layer called while no pass is open
  (a training step that calls ``model.encoder`` rather than ``model``) opens one itself,
  unless autograd is running a backward pass.
- Reentrant checkpointing (``use_reentrant=True``) runs its region under ``no_grad``,
  where an output cannot be regularized: such calls are noted, and a layer that only ran
  that way makes ``loss()`` raise an error naming the fix.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.module_tracker import ModuleTracker

Pool = str | Callable[..., torch.Tensor]
POOLS = ("mean", "flatten", "cls")

# Its ``is_bw`` says whether autograd is running a backward pass (the public form of that
# question). Never entered as a context: it tracks nothing.
_BACKWARD = ModuleTracker()


def in_backward() -> bool:
    """True while autograd runs a backward pass outside compiled code (where activation
    checkpointing reruns layers); compiled code never runs Python hooks there."""
    return not torch.compiler.is_compiling() and _BACKWARD.is_bw


class Call(NamedTuple):
    """One training call of a regularized layer: the layer's index, its pooled output
    (``rows`` samples of C features once reshaped) and, for ``pool="flatten"`` with a
    padding mask, the (B, T) mask that selects its real tokens (else None)."""

    layer: int
    features: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Samples N: B, or B * T for a (B, T, C) output taken token by token."""
        f = self.features
        if self.mask is not None:
            raise RuntimeError("a masked call's rows are known once its tokens are selected")
        return f.shape[0] * f.shape[1] if f.dim() == 3 else f.shape[0]


def pool_output(output: Any, pool: Pool, mask: torch.Tensor | None = None,
                pool_takes_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's output pooled for the statistics, keeping the pooled dimensions, and the
    mask still to apply (``"flatten"`` with a mask selects its tokens later, outside the
    compiled graph, because their number depends on the data).

    ``mask``: (B, T), true (or 1) at real tokens, applied to (B, T, C) outputs only.
    Keeping the dimensions makes the pooling's backward one kernel fewer (no unsqueeze),
    which counts on a GPU where the hooks of every layer are launch-bound.
    """
    if callable(pool):
        x = pool(output, mask=mask) if pool_takes_mask else pool(output)
        if not (isinstance(x, torch.Tensor) and x.dim() == 2):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"a pool callable must return features (N, C), got {shape}")
        return x, None
    x = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"cannot regularize a layer output of type {type(x).__name__}")
    if x.dim() == 2:
        return x, None
    if mask is not None and x.dim() == 3 and pool != "cls":
        _check_mask(mask, x)
        if pool == "flatten":
            return x, mask
        weights = mask.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1), None
    if pool == "mean" and x.dim() in (3, 4):
        return x.mean(1 if x.dim() == 3 else (2, 3), keepdim=True), None
    if pool == "flatten" and x.dim() == 3:
        return x, None
    if pool == "cls" and x.dim() == 3:
        return x[:, :1], None
    raise ValueError(f"pool={pool!r} cannot turn an output of shape {tuple(x.shape)} into (N, C)")


def _check_mask(mask: torch.Tensor, x: torch.Tensor) -> None:
    if mask.shape != x.shape[:2]:
        raise ValueError(f"the padding mask has shape {tuple(mask.shape)}, but a regularized "
                         f"layer's output is {tuple(x.shape)}: the mask must be (B, T) = "
                         f"{tuple(x.shape[:2])}, true at real tokens")


def features_of(call: Call) -> torch.Tensor:
    """The call's features (N, C): masked tokens dropped, every sample a row."""
    if call.mask is not None:
        return call.features[call.mask.bool()]
    return call.features.reshape(call.rows, -1)


def takes_mask(pool: Pool) -> bool:
    """Whether a pool callable accepts a ``mask`` keyword (then it gets the padding mask)."""
    if not callable(pool):
        return False
    try:
        return "mask" in inspect.signature(pool).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


class LayerCapture:
    """The hooks of one handle and the passes they recorded since the last :meth:`take`.

    Keeps at most ``accumulate`` passes (older ones are dropped and counted), so a handle
    whose loss is never asked for holds that many forwards' features at most.
    """

    def __init__(self, model: nn.Module, names: list[str], pool: Pool, accumulate: int) -> None:
        modules = dict(model.named_modules())
        self.model = model
        self.modules = [modules[n] for n in names]
        self.pool = pool
        self.accumulate = accumulate
        self.passes: list[list[Call]] = []
        self.no_grad_layers: set[int] = set()  # layers called under no_grad in a pass
        self.dropped = 0  # passes dropped beyond `accumulate`
        self.mask: torch.Tensor | None = None  # padding mask of the next forward
        self.depth = 0  # calls of the model running (a wrapper may re-enter it: Lightning)
        self.forward_seen = False  # a pass ever opened (for the error when none did)
        self.layer_seen = False  # a layer call was ever recorded (likewise)
        capture, pool_takes_mask = self, takes_mask(pool)

        def start(module: nn.Module, args: Any) -> None:
            if module is capture.model and module.training and torch.is_grad_enabled() \
                    and not in_backward():
                if not capture.depth:  # a call inside a call of the model is the same pass
                    capture.new_pass()
                capture.depth += 1

        def end(module: nn.Module, args: Any, output: Any) -> None:
            if module is capture.model and capture.depth:
                capture.depth -= 1
                if not capture.depth:
                    capture.mask = None  # it was the mask of this forward

        def layer_hook(index: int) -> Callable:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if module is not capture.modules[index] or not module.training:
                    return
                if not torch.is_grad_enabled():
                    if capture.depth:  # inside the forward: reentrant checkpointing?
                        capture.no_grad_layers.add(index)
                    return
                if not capture.depth:
                    if in_backward():
                        return  # recomputed by activation checkpointing
                    if not capture.passes:
                        capture.new_pass()
                features, mask = pool_output(output, capture.pool, capture.mask, pool_takes_mask)
                capture.passes[-1].append(Call(index, features, mask))
                capture.layer_seen = True

            return hook

        self._handles = [model.register_forward_pre_hook(start),
                         model.register_forward_hook(end, always_call=True)]
        self._handles += [m.register_forward_hook(layer_hook(i)) for i, m in enumerate(self.modules)]

    def new_pass(self) -> None:
        if len(self.passes) >= self.accumulate:
            self.passes.pop(0)
            self.dropped += 1
        self.passes.append([])
        self.forward_seen = True

    def take(self) -> tuple[list[list[Call]], int, set[int]]:
        """The recorded passes, the number of forwards they came from (dropped ones
        included) and the layers called only under no_grad in them; then empty."""
        passes, forwards = self.passes, len(self.passes) + self.dropped
        no_grad = self.no_grad_layers - {c.layer for p in passes for c in p}
        self.clear()
        return passes, forwards, no_grad

    def clear(self) -> None:
        # New lists rather than .clear(): a list taken by take() stays intact.
        self.passes, self.no_grad_layers, self.dropped = [], set(), 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
