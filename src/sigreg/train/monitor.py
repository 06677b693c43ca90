"""Live collapse monitor: effective dimension of each watched layer every few steps.

It reads the features of a batch the training step computes anyway (a
:class:`sigreg.FeatureRecorder` is switched on for that one forward pass), so the cost is
one (C, C) covariance per layer every ``every`` steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import nn

from ..attach import FeatureRecorder
from ..diagnostics import effective_dimension


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
        """Effective dimension per layer of the features recorded in the last forward."""
        dims, ratios = {}, {}
        for name, z in self.recorder.features.items():
            if z.shape[0] < 2:
                continue
            dims[name] = effective_dimension(z)
            ratios[name] = dims[name] / z.shape[1]
            self._check(name, ratios[name], dims[name], z.shape[1], step)
        return {"kind": "monitor", "step": step, "epoch": epoch, "eff_dim": dims, "eff_dim_ratio": ratios}

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

