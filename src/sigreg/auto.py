"""A regularizer weight that sets itself: ``sigreg.attach(..., alpha="auto")``.

What the weight is for. SIGReg is there to keep the regularized layers' features from
collapsing, not to whiten them at any price. Its two failure modes are (a) too weak: the
features collapse as they would without it; (b) too strong: its gradient at the regularized
layers outweighs the task's and the task stops learning (on the 5000-image ViT, weak at
alpha 0.1 and lr 3e-2 sits at chance from the first epoch where the baseline learns). Both
are statements about one number, measured where the two losses meet: the *share*

    rho = || dR / dX || / || dT / dX ||,

with X the output of the last regularized layer of the forward pass (in execution order),
dT / dX the gradient the task loss T sends it and dR / dX the regularizer's (the handle's
mean over layers), each as it enters the combined loss. The last layer's output is the one
place where one backward tells the two apart: an earlier layer's output also receives the
regularizer terms of the layers after it, through them, mixed with the task's. A fixed
alpha fixes neither gradient: rho drifts by orders of magnitude across models, learning
rates and training time, which is why the best alpha moves (weak 0.3-0.5 on the deep MLP,
strong 0.01-0.03; strong at 0.1 costs small ViTs 15-25 points).

The rule (gradient-share weighting, second design). Hold rho at or below a target
``share`` c: at each step, with w = alpha / (1 - alpha) the regularizer's weight relative to
the task's,

    g_T(t) = || dT/dX ||^2,   g_R(t) = || dR/dX ||^2          (raw: unweighted losses)
    m_T <- beta m_T + (1 - beta) g_T,   m_R <- beta m_R + (1 - beta) g_R
    w*(t) = c * sqrt(m_T / m_R)                                (the weight giving rho = c)
    w(t + 1) = clip(min(w*(t), rate * w(t)), w_min, w_max),    alpha = w / (1 + w)

and the combined loss is ``(1 - alpha) * task + alpha * reg`` as with a fixed alpha (so
the fixed-alpha grid and ``auto`` compare on the same footing, also under plain SGD). At the
last regularized layer the regularizer then takes about c of what the task sends: mode (b)
is excluded there by construction for c < 1 (earlier layers receive the sum of the later
layers' terms too, which is what a fixed alpha gives them as well), and its push against
collapse does not fade as the task gradient grows or its own raw gradient shrinks. This is
GradNorm's device (Chen et al., ICML 2018: weigh each loss by the norm of its gradient at
the last shared layer, measured during training) with the balance point a fixed ratio c
instead of equal training rates, and the "not too strong" view of the regularizer (its
gradient against the task's at the regularized layers) as the quantity held.

Why the weight rises slowly and falls at once (what the first design showed). The first
design set w = w* directly. On the 5000-image ViT at lr 3e-2 the regularizer's gradient is
~0 at initialisation (the share at alpha 0.1 was 0.0, 0.4, 4.5, 16, ... 110 over the first
ten steps: the task's large first AdamW steps blow the features' scale up, and weak
SIGReg's gradient grows like the cube of that scale), so the first measurement asked for the
largest weight, alpha 0.5 for one step, exactly when the regularizer was about to dominate;
the run never left chance although alpha fell to ~0.01 after. The rule's evidence is a
gradient ratio measured one step late, and it says nothing about what a larger weight will
do once the features move. So the weight starts small (``initial`` w = 0.01) and may grow by
at most a factor ``rate`` (1.05) per update, the multiplicative ramp of a warm-up (0.01 to 1
takes ~94 steps); it may fall to w* in one update, because falling is the safe direction
(the failure that a late weight causes is mode (b)). The same ramp covers the case where the
rule asks for an unbounded weight: while the features of a dead deep MLP are near zero, so
is the regularizer's gradient (the share at a held alpha was ~0 for the first 40 % of
training), and w climbs to ``w_max`` = 1. That bound is safe in the rule's own terms: the
regularizer's weighted gradient is then w ||dR/dX|| < c ||dT/dX|| (it is below target: the
rule wanted more), so a dead layer's large weight pushes with less than c of the task's
gradient, and the ramp and the immediate fall keep the weight from overshooting when the
features come alive.

Constants, fixed once, to be judged on other settings and seeds (``experiments/auto_weight.py``,
report phase). c = 0.125: the share measured on seed 0 at the last hidden layer of the deep
MLP under weak alpha 0.3, its best fixed alpha (0.13 after the features came alive; 0.09 at
alpha 0.1), so that on that setting the rule lands near the best fixed weight; the first
design's c = 0.25 asked for more than alpha 0.5 there throughout (68.2 % against alpha 0.3's
71.2 %). On the ViT at lr 3e-2, where weak alpha 0.1 gave shares of 12-110 (the collapse),
c = 0.125 asks for alpha ~1e-3. ``smoothing`` beta = 0.95 (about 20 steps), ``initial`` w =
0.01, ``rate`` = 1.05, bounds w in [1e-4, 1] (alpha in [1e-4, 0.5]: the regularizer never
weighs more than the task).

What the second design showed (seed 0; ``experiments/auto_weight.py`` has the numbers): on
the deep MLP the rule lands within 0.3 points of the best fixed alpha (70.9 % against 71.2),
at alpha 0.5 while the features are dead and 0.21-0.26 after. On the ViT at lr 3e-2 it
keeps alpha at 0.003-0.011 and the run still sits at chance, as does a fixed alpha of 0.001:
there the regularizer, pulling the residual stream's variance (the baseline's grows to
~1e5) toward 1 in the same direction at every step, collapses the features at any weight
tried, although its gradient per step is an eighth of the task's. The share of gradient
norms per step does not measure a small pull that never changes direction; that case is
open.

Cost: no extra backward pass. The regularized layers' outputs are passed to the pooling
through a view (one autograd node each); two tensor hooks on the last one read the two
gradients during the ordinary backward (the view's is the regularizer's, the output's the
sum: the task's is the difference) and add two squared norms to a pending buffer on the
device (no sync). The next :meth:`~sigreg.SIGRegHandle.loss` (or
:meth:`~sigreg.SIGRegHandle.settle`) folds the buffer into the averages: the weight is
lagged by one step. The tensor hooks need the regularized layers to run eagerly (a model
compiled with ``torch.compile`` hides the gradients inside its graph): a step whose hooks
saw nothing warns, naming this, and the weight keeps its value.

Distributed: the squared norms are summed over the ranks in one all-reduce of three numbers
when they are folded, so every rank takes the same weight (each rank's hooks see its own
rows of the global-batch gradient). State: the averages, the weight, the pending buffer
and the number of updates are part of the handle's ``state_dict``: a run cut and resumed
takes the weights of the uncut run.
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
        base: the alpha in effect while the regularizer pulls the features inward (and at
            the start), in (0, 0.5].
        high: the largest alpha, reached while the regularizer pushes them outward, in
            [base, 0.5].
        smoothing: beta of the moving average of the radial cosine, in [0, 1).
        rate: the factor by which w = alpha / (1 - alpha) moves in one update, > 1.
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
        # sums of <g, X>, |g|^2 and |X|^2 over the hooks (and ranks); the hooks that fired
        self._pending = torch.zeros(4, dtype=torch.float32)
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
                    (g * x).sum(), g.square().sum(), x.square().sum(), g.new_ones(())))
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
        dot, gg, xx, count = pending.unbind()
        # sqrt of each: features of 1e-10 would underflow the product |g|^2 |X|^2.
        cosine = dot / (gg.sqrt() * xx.sqrt()).clamp_min(_TINY)
        average = self.smoothing * self._average + (1 - self.smoothing) * cosine
        # Outward (cosine < 0: a descent step grows X): up by `rate`; inward: down by it.
        step = torch.where(average < 0, self.rate, 1 / self.rate)
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
        shapes = {"weight": (), "average": (), "pending": (4,)}
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
