"""Live collapse monitor: cheap per-layer statistics of each watched layer every few steps.

It reads the features of a batch the training step computes anyway (a
:class:`sigreg.FeatureRecorder` is switched on for that one forward pass), so the cost is
one Gram matrix per layer every ``every`` steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..attach import FeatureRecorder
from ..diagnostics import mean_pairwise_cosine

# Per-layer signals logged in every monitor row, besides eff_dim and eff_dim_ratio.
SIGNALS = ("mean_cosine", "feature_var", "weak_distance")


def layer_signals(z: Tensor) -> dict[str, float]:
    """Statistics of one layer's features ``z`` (N, C) from the trace and Frobenius norm of
    its covariance ``S``, in float64.

    ``eff_dim`` = tr(S)^2 / ||S||_F^2 (as :func:`sigreg.diagnostics.effective_dimension`),
    ``eff_dim_ratio`` = eff_dim / C, ``mean_cosine`` between samples, ``feature_var`` =
    tr(S) / C (mean variance of a channel: how much signal is left), ``weak_distance`` =
    ||S - I||_F (weak SIGReg on the full covariance).
    """
    centred = z.detach().to(torch.float64)
    centred = centred - centred.mean(0)
    n, width = centred.shape
    # Zc^T Zc (C, C) and Zc Zc^T (N, N) have the same trace and Frobenius norm: use the
    # smaller (half the multiply-adds of the covariance for a batch of 128 at width 256).
    gram = centred @ centred.T if n < width else centred.T @ centred
    trace = float(torch.trace(gram)) / (n - 1)
    frob2 = float((gram * gram).sum()) / (n - 1) ** 2
    eff = trace * trace / frob2 if frob2 > 0 else 0.0
    # ||S - I||^2 = ||S||^2 - 2 tr(S) + C: no (C, C) identity needed.
    weak = math.sqrt(max(frob2 - 2 * trace + width, 0.0))
    return {"eff_dim": eff, "eff_dim_ratio": eff / width, "mean_cosine": mean_pairwise_cosine(z),
            "feature_var": trace / width, "weak_distance": weak}


# Which way each signal points at collapse: warn when it is below (True) or above the threshold.
BELOW = {"eff_dim_ratio": True, "mean_cosine": False, "feature_var": True, "weak_distance": False}
# The default warning, chosen on a grid of 54 MLP runs (docs/studies.md, section 6):
# every layer's samples point one way (mean cosine > 0.99) for 8 measurements in a row. Low
# effective dimension, the old default, fired on 27 of 34 healthy runs.
DEFAULT_SIGNAL = "mean_cosine"
DEFAULT_THRESHOLD = 0.99
DEFAULT_PATIENCE = 8


class CollapseMonitor:
    """Logs every signal of :func:`layer_signals` per layer every ``every`` steps, and warns
    when ``signal`` is past ``threshold`` (below it for ``eff_dim_ratio`` / ``feature_var``,
    above it for ``mean_cosine`` / ``weak_distance``) in ``patience`` measurements in a row:
    once per layer per episode; the episode ends at the first measurement where it is not.
    ``threshold=None`` takes the default signal's threshold.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        pool: str,
        every: int,
        threshold: float | None = None,
        warn: Callable[[str], None] = print,
        *,
        signal: str = DEFAULT_SIGNAL,
        patience: int = DEFAULT_PATIENCE,
    ) -> None:
        if signal not in BELOW:
            raise ValueError(f"signal must be one of {', '.join(BELOW)}; got {signal!r}")
        if threshold is None and signal != DEFAULT_SIGNAL:
            raise ValueError(f"give a threshold for signal {signal!r} (the default threshold "
                             f"{DEFAULT_THRESHOLD} is {DEFAULT_SIGNAL}'s)")
        if patience < 1:
            raise ValueError(f"patience must be at least 1 measurement, got {patience}")
        self.recorder = FeatureRecorder(model, layers, pool)
        self.every = every
        self.signal = signal
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.patience = patience
        self.warn = warn
        self._streak: dict[str, int] = {}  # layer -> measurements in a row past the threshold

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def measure(self, step: int, epoch: int) -> dict:
        """Per-layer signals of the features recorded in the last forward, as one row:
        ``{"kind": "monitor", "step", "epoch", "eff_dim": {layer: v}, "eff_dim_ratio": {...},
        "mean_cosine": {...}, "feature_var": {...}, "weak_distance": {...}}``."""
        row: dict = {"kind": "monitor", "step": step, "epoch": epoch,
                     **{key: {} for key in ("eff_dim", "eff_dim_ratio", *SIGNALS)}}
        for name, z in self.recorder.features.items():
            if z.shape[0] < 2:
                continue
            for key, value in layer_signals(z).items():
                row[key][name] = value
            self._check(name, row[self.signal][name], step)
        return row

    def _past(self, value: float) -> bool:
        return value < self.threshold if BELOW[self.signal] else value > self.threshold

    def _check(self, name: str, value: float, step: int) -> None:
        streak = self._streak.get(name, 0) + 1 if self._past(value) else 0
        self._streak[name] = streak
        if streak == self.patience:  # exactly once: the streak passes it only once per episode
            side = "<" if BELOW[self.signal] else ">"
            since = step - (self.patience - 1) * self.every
            self.warn(f"collapse warning: layer {name} {self.signal} {value:.3g} {side} "
                      f"{self.threshold:g} in {self.patience} measurements in a row "
                      f"(steps {since}-{step})")

    def recording(self, step: int):
        """Context manager: record this step's forward if a measurement is due."""
        return self.recorder.recording() if self.due(step) else contextlib.nullcontext()
