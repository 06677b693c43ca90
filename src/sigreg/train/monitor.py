"""Live collapse monitor: cheap per-layer statistics of each watched layer every few steps.

It reads the features of a batch the training step computes anyway (a
:class:`sigreg.FeatureRecorder` is switched on for that one forward pass), so the cost is
one (C, C) covariance per layer every ``every`` steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..attach import FeatureRecorder
from ..diagnostics import covariance, mean_pairwise_cosine

# Per-layer signals logged in every monitor row, besides eff_dim and eff_dim_ratio.
SIGNALS = ("mean_cosine", "feature_var", "weak_distance")


def layer_signals(z: Tensor) -> dict[str, float]:
    """Statistics of one layer's features ``z`` (N, C) from one covariance ``S``.

    ``eff_dim`` = tr(S)^2 / ||S||_F^2 (as :func:`sigreg.diagnostics.effective_dimension`),
    ``eff_dim_ratio`` = eff_dim / C, ``mean_cosine`` between samples, ``feature_var`` =
    tr(S) / C (mean variance of a channel: how much signal is left), ``weak_distance`` =
    ||S - I||_F (weak SIGReg on the full covariance).
    """
    cov = covariance(z)
    width = cov.shape[0]
    trace = float(torch.trace(cov))
    frob2 = float((cov * cov).sum())
    eff = trace * trace / frob2 if frob2 > 0 else 0.0
    # ||S - I||^2 = ||S||^2 - 2 tr(S) + C: no (C, C) identity needed.
    weak = math.sqrt(max(frob2 - 2 * trace + width, 0.0))
    return {"eff_dim": eff, "eff_dim_ratio": eff / width, "mean_cosine": mean_pairwise_cosine(z),
            "feature_var": trace / width, "weak_distance": weak}


class CollapseMonitor:
    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        pool: str,
        every: int,
        threshold: float,
        warn: Callable[[str], None] = print,
    ) -> None:
        self.recorder = FeatureRecorder(model, layers, pool)
        self.every = every
        self.threshold = threshold
        self.warn = warn
        self._collapsed: set[str] = set()

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
            self._check(name, row["eff_dim_ratio"][name], row["eff_dim"][name], z.shape[1], step)
        return row

    def _check(self, name: str, ratio: float, dim: float, width: int, step: int) -> None:
        # One line when a layer goes below the threshold, again only after it recovered.
        if ratio < self.threshold and name not in self._collapsed:
            self._collapsed.add(name)
            self.warn(
                f"collapse warning: layer {name} effective dimension {dim:.1f} of {width} "
                f"({ratio:.1%} < {self.threshold:.0%}) at step {step}"
            )
        elif ratio >= self.threshold:
            self._collapsed.discard(name)

    def recording(self, step: int):
        """Context manager: record this step's forward if a measurement is due."""
        return self.recorder.recording() if self.due(step) else contextlib.nullcontext()
