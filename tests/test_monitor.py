"""The live collapse monitor: its per-layer signals and when it warns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sigreg.diagnostics import diagnose
from sigreg.train.monitor import (
    DEFAULT_PATIENCE,
    DEFAULT_SIGNAL,
    DEFAULT_THRESHOLD,
    CollapseMonitor,
    layer_signals,
)


@pytest.mark.parametrize("n, c", [(64, 32), (16, 48)])  # covariance, and Gram (N < C) path
def test_layer_signals_match_the_diagnostics(n, c):
    torch.manual_seed(0)
    z = torch.randn(n, c) * torch.linspace(0.1, 3.0, c) + 0.5
    got, ref = layer_signals(z), diagnose(z)
    assert got["eff_dim"] == pytest.approx(ref["effective_dim"], rel=1e-9)
    assert got["eff_dim_ratio"] == pytest.approx(ref["effective_dim"] / c, rel=1e-9)
    assert got["mean_cosine"] == pytest.approx(ref["mean_cosine"], rel=1e-9)
    assert got["weak_distance"] == pytest.approx(ref["weak_sigreg_distance"], rel=1e-9)
    assert got["feature_var"] == pytest.approx(z.double().var(0).mean().item(), rel=1e-9)


def collapsed(n: int = 32, c: int = 8) -> torch.Tensor:
    """Every sample the same direction, tiny noise: cosine ~ 1, variance ~ 0."""
    return torch.ones(n, c) + 1e-4 * torch.randn(n, c)


def healthy(n: int = 32, c: int = 8) -> torch.Tensor:
    return torch.randn(n, c)


def run(monitor: CollapseMonitor, model: nn.Module, batches: list[torch.Tensor]) -> list[dict]:
    rows = []
    for step, x in enumerate(batches):
        with monitor.recording(step):
            model(x)
        rows.append(monitor.measure(step, 1))
    return rows


def test_rows_hold_every_signal_for_every_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    monitor = CollapseMonitor(model, ["0", "2"], "mean", 1, warn=lambda line: None)
    (row,) = run(monitor, model, [healthy()])
    assert row["kind"] == "monitor" and row["step"] == 0
    for key in ("eff_dim", "eff_dim_ratio", "mean_cosine", "feature_var", "weak_distance"):
        assert set(row[key]) == {"0", "2"}


def test_warns_once_per_layer_per_episode_after_patience():
    torch.manual_seed(0)
    lines: list[str] = []
    model = nn.Sequential(nn.Identity())
    monitor = CollapseMonitor(model, ["0"], "mean", 1, 0.9, lines.append,
                              signal="mean_cosine", patience=3)
    # Two collapsed measurements: not yet; the third warns; more do not repeat it; a healthy
    # one ends the episode; three more collapsed ones warn again.
    batches = [collapsed()] * 2 + [collapsed()] * 3 + [healthy()] + [collapsed()] * 3
    run(monitor, model, batches)
    assert len(lines) == 2
    assert "mean_cosine" in lines[0] and "(steps 0-2)" in lines[0]
    assert "(steps 6-8)" in lines[1]


def test_below_signals_warn_below_the_threshold():
    lines: list[str] = []
    model = nn.Sequential(nn.Identity())
    monitor = CollapseMonitor(model, ["0"], "mean", 1, 1e-3, lines.append,
                              signal="feature_var", patience=1)
    run(monitor, model, [healthy(), collapsed()])
    assert len(lines) == 1 and "feature_var" in lines[0] and "< 0.001" in lines[0]


def test_default_rule_fires_on_collapse_and_not_on_healthy_features():
    lines: list[str] = []
    model = nn.Sequential(nn.Identity())
    monitor = CollapseMonitor(model, ["0"], "mean", 25, warn=lines.append)
    assert (monitor.signal, monitor.threshold, monitor.patience) == (
        DEFAULT_SIGNAL, DEFAULT_THRESHOLD, DEFAULT_PATIENCE)
    for step in range(0, 25 * DEFAULT_PATIENCE * 2, 25):
        with monitor.recording(step):
            model(healthy())
        monitor.measure(step, 1)
    assert lines == []
    for step in range(1000, 1000 + 25 * DEFAULT_PATIENCE, 25):
        with monitor.recording(step):
            model(collapsed())
        monitor.measure(step, 1)
    assert len(lines) == 1


def test_bad_arguments():
    model = nn.Sequential(nn.Identity())
    with pytest.raises(ValueError, match="signal must be one of"):
        CollapseMonitor(model, ["0"], "mean", 1, 0.5, signal="entropy")
    with pytest.raises(ValueError, match="give a threshold"):
        CollapseMonitor(model, ["0"], "mean", 1, signal="feature_var")
    with pytest.raises(ValueError, match="patience"):
        CollapseMonitor(model, ["0"], "mean", 1, 0.5, patience=0)
