"""A regularizer weight that sets itself: ``sigreg.attach(..., alpha="auto")``.

What the weight is for. SIGReg is there to keep the regularized layers' features from
collapsing, not to whiten them at any price. Where a fixed weight is too small, the failure
is a dead layer: features far below unit power (a deep MLP with PyTorch's default init,
whose signal shrinks layer by layer) that the regularizer revives too slowly. Where it is
too large, the regularizer buys isotropy with the features' power: weak SIGReg's
|| Cov - I || is lowered by scaling anisotropic features down until their largest variances
are about 1 (on the He-initialised MLPs alpha 0.3 costs 2 points; docs/studies.md, section
15). One measurement tells the two apart: the direction of the regularizer's gradient at a
layer's output X relative to X itself, the *radial cosine*

    cos = < g, X > / (|g| |X|),     g = d(alpha * reg) / dX.

A gradient-descent step moves X along -g: cos < 0 means the regularizer grows the features
(pushes them outward), cos > 0 that it shrinks them.

The rule. Start at the paper's weight (``base``, alpha 0.1). After each backward, with m the
moving average of cos at the last regularized layer (``smoothing`` beta 0.9) and P the mean
square of that layer's output (over every entry: the scale at which ``scale_invariant=True``
switches from the paper's loss to isotropy at the features' own power),

    w = alpha / (1 - alpha),
    w <- min(w * rate, w(high))   if m < 0 and P < 1   (the regularizer revives a dead layer)
    w <- max(w / rate, w(base))   otherwise            (back to the paper's weight)

with ``rate`` 1.05 (alpha 0.1 to 0.5 in 45 steps) and ``high`` alpha 0.5 (the regularizer
never weighs more than the task). The combined loss is ``(1 - alpha) * task + alpha * reg``
as with a fixed alpha. So the weight rises only while the regularizer does what a larger
weight is for, only for as long as it does, and never goes below the paper's weight. It is
a Lagrange-multiplier update in the manner of GECO (Rezende and Viola, "Taming VAEs", 2018:
the multiplier of a constraint grows while the constraint is violated and shrinks while it
holds) with a sign step, for the constraint "the last regularized layer is not dead".

What it does not do: choose a weight below the paper's where a smaller one generalises
better (the byte-level LM, whose best fixed weight is 0.01; ``AutoWeight(base=0.01)``), or
tell a dead layer from features that the task keeps small and that the regularizer keeps
pushing out (then the weight stays high). The design history, including the rules that
failed (a gradient share held fixed: GradNorm's device, Chen et al. 2018, asked for alpha
0.35-0.5 on the He-initialised MLP; a loss share; the sign rule without the unit-power
gate, which held the LM at alpha 0.5), is in docs/studies.md, section 15. Under the paper's
loss no weight removes the collapse of the small ViT at lr 3e-2 (the regularizer pulls a
growing residual stream inward); use ``alpha="auto"`` with ``scale_invariant=True`` (weak).

Why the last regularized layer: its output is the one place where one backward tells the
regularizer's gradient apart from everything else (the regularizer reads a view of it, whose
gradient is the regularizer's alone; an earlier layer's output also receives the later
layers' terms).

Cost: no extra backward pass. The regularized layers' outputs are passed to the pooling
through a view (one autograd node each); a tensor hook on the last one's view reads the
regularizer's gradient during the ordinary backward and adds <g, X>, |g|^2, |X|^2 and X's
number of entries to a pending buffer on the device (no sync). The next
:meth:`~sigreg.SIGRegHandle.loss` (or :meth:`~sigreg.SIGRegHandle.settle`) folds the buffer
into the average: the weight is lagged by one step. The tensor hook needs the regularized
layers to run eagerly (a model compiled with ``torch.compile`` hides the gradients inside
its graph): a step whose hook saw nothing warns, naming this, and the weight keeps its value.

Distributed: the sums are added over the ranks in one all-reduce of five numbers when they
are folded, so every rank takes the same weight, the one a single process with the global
batch would take. State: the average, the weight, the pending sums and the number of
updates are part of the handle's ``state_dict``: a run cut and resumed takes the weights of
the uncut run.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist

from ._checks import check_number

AUTO = "auto"
_TINY = torch.finfo(torch.float32).tiny


class AutoWeight:
    """The state and rule of ``alpha="auto"`` (see the module docstring).

    Args:
        base: the alpha at the start and whenever the last regularized layer is not being
            revived, in (0, 0.5].
        high: the largest alpha, approached while it is (pushed outward below unit
            power), in [base, 0.5].
        smoothing: beta of the moving average of the radial cosine, in [0, 1).
        rate: the factor by which w = alpha / (1 - alpha) moves in one update, > 1 and finite.

    Raises:
        TypeError: a non-number argument. ValueError: one outside its range.

    Example::

        handle = sigreg.attach(model, "blocks.*", "weak", scale_invariant=True,
                               alpha=AutoWeight(base=0.01))   # or alpha="auto": base 0.1
        loss = handle.combine(task_loss)   # (1 - alpha) * task + alpha * reg
        loss.backward()                    # the hook reads the regularizer's gradient
        handle.weight                      # the alpha of the next combine (a 0-d tensor)

    Reference: the rule is a sign-step Lagrange multiplier in the manner of GECO (Rezende
    and Viola, "Taming VAEs", 2018); the quantity it reads is this library's.
    """

    def __init__(self, base: float = 0.1, high: float = 0.5, smoothing: float = 0.9,
                 rate: float = 1.05) -> None:
        self.base = check_number(base, "base")
        self.high = check_number(high, "high")
        self.smoothing = check_number(smoothing, "smoothing")
        self.rate = check_number(rate, "rate")
        if not 0 < self.base <= 0.5:
            raise ValueError(f"base must lie in (0, 0.5], got {base}")
        if not self.base <= self.high <= 0.5:
            raise ValueError(f"high must lie in [base, 0.5] = [{base}, 0.5], got {high}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must lie in [0, 1), got {smoothing}")
        if not 1 < self.rate < math.inf:
            raise ValueError(f"rate must be > 1 and finite, got {rate}")
        self.bounds = (self.base / (1 - self.base), self.high / (1 - self.high))  # of w
        self.updates = 0  # folds of measured gradients so far
        self._w = torch.tensor(self.bounds[0], dtype=torch.float32)  # the weight w in effect
        self._average = torch.zeros((), dtype=torch.float32)  # of the radial cosine
        # <g, X>, |g|^2, |X|^2, X's number of entries and the hooks that fired, summed over
        # the hooks (and ranks) since the last fold
        self._pending = torch.zeros(5, dtype=torch.float32)
        self._measured = 0  # hooks that fired since the last fold (a Python count)
        self._expected = 0  # hooks registered since the last fold
        self._watched = False  # watch() was called since the last fold
        self._warned = False

    # ---- the weight ------------------------------------------------------------------------

    @property
    def alpha(self) -> torch.Tensor:
        """The alpha in effect, 0-d float32 on the features' device (no sync)."""
        return self._w / (1 + self._w)

    @property
    def weight(self) -> float:
        """The alpha in effect, as a float (a device sync)."""
        return float(self.alpha)

    def combine(self, task_loss: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) * task + alpha * reg`` with the alpha in effect."""
        a = self.alpha.to(device=reg.device)
        return (1 - a).to(task_loss.dtype) * task_loss + a.to(reg.dtype) * reg

    # ---- measuring, during the ordinary backward -------------------------------------------

    def watch(self, sources: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hook the pairs (layer output X, the view of it the regularizer was computed
        from): the regularizer's gradient at X in the coming backward is measured."""
        self._watched = True  # called by every rank's loss() alike: settle() follows this
        if not sources:
            return
        self._to(sources[0][0].device)
        for output, view in sources:
            if not view.requires_grad:
                continue
            self._expected += 1
            features = output.detach()

            def on_view(grad: torch.Tensor, x: torch.Tensor = features) -> None:
                g, x = grad.float(), x.float()
                self._pending += torch.stack((
                    (g * x).sum(), g.square().sum(), x.square().sum(),
                    g.new_tensor(float(x.numel())), g.new_ones(())))
                self._measured += 1

            view.register_hook(on_view)

    # ---- updating ----------------------------------------------------------------------------

    def settle(self, distributed: bool = False) -> None:
        """Fold the gradients measured since the last call into the average and set the
        next weight. Under torch.distributed (``distributed``), a collective: every rank
        calls it at the same point (the handle's ``loss()`` does)."""
        if not self._watched:
            return
        expected, measured = self._expected, self._measured
        self._expected = self._measured = 0
        self._watched = False
        if expected and not measured and not self._warned:
            self._warned = True
            warnings.warn(
                "SIGReg alpha='auto' measured no gradient at the regularized layers since the "
                "last loss(): no backward ran through it, or the model is compiled "
                "(torch.compile's graph does not call the tensor hooks that read the "
                "gradients). The weight keeps its value until gradients are measured; run "
                "the regularized layers eagerly, or use a fixed alpha. Said once.",
                stacklevel=4)
        pending = self._pending
        if distributed:  # every rank calls this: the sums over the ranks, on every rank
            pending = pending.clone()
            dist.all_reduce(pending)
        elif not measured:
            return
        self._pending = torch.zeros_like(self._pending)
        dot, gg, xx, entries, count = pending.unbind()
        # sqrt of each: features of 1e-10 would underflow the product |g|^2 |X|^2.
        cosine = dot / (gg.sqrt() * xx.sqrt()).clamp_min(_TINY)
        average = self.smoothing * self._average + (1 - self.smoothing) * cosine
        # Reviving (pushed outward, cosine < 0, while below unit power): up by `rate`;
        # otherwise down by it, to the base.
        reviving = (average < 0) & (xx < entries)
        step = torch.where(reviving, self.rate, 1 / self.rate)
        w = (self._w * step).clamp(*self.bounds)
        # No sync: where no rank measured anything (count == 0), nothing changes.
        some = count > 0
        self._average = torch.where(some, average, self._average)
        self._w = torch.where(some, w, self._w)
        self.updates += 1

    def _to(self, device: torch.device) -> None:
        if self._w.device != device:
            self._w, self._average, self._pending = (
                t.to(device) for t in (self._w, self._average, self._pending))

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the next weights depend on, as CPU tensors: the weight, the averages,
        the gradients measured and not yet folded, the number of updates."""
        return {"weight": self._w.detach().cpu().clone(),
                "average": self._average.detach().cpu().clone(),
                "pending": self._pending.detach().cpu().clone(), "updates": self.updates,
                "watched": self._watched}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (ValueError for anything else)."""
        shapes = {"weight": (), "average": (), "pending": (5,)}
        if not isinstance(state, dict) or set(state) != {*shapes, "updates", "watched"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"an automatic-weight state has keys weight, average, pending, "
                             f"updates, watched; got {keys}")
        for key, shape in shapes.items():
            t = state[key]
            if not (isinstance(t, torch.Tensor) and tuple(t.shape) == shape
                    and t.is_floating_point()):
                raise ValueError(f"the automatic weight's {key!r} must be a float tensor of "
                                 f"shape {shape}")
        updates = state["updates"]
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError("the automatic weight's 'updates' must be an integer >= 0")
        if not isinstance(state["watched"], bool):
            raise TypeError("the automatic weight's 'watched' must be true or false")
        device = self._w.device
        self._w = state["weight"].float().to(device).clone()
        self._average = state["average"].float().to(device).clone()
        self._pending = state["pending"].float().to(device).clone()
        self.updates = updates
        # Gradients measured before the save and not folded yet: settle() folds them.
        self._watched = state["watched"]
        self._expected = self._measured = int(self._watched)

    def __repr__(self) -> str:
        return (f"AutoWeight(base={self.base}, high={self.high}, smoothing={self.smoothing}, "
                f"rate={self.rate})")
