"""The aten ops one training step gains from attach (the CPU-side measure of GPU launch
cost), counted, not timed: the op budget on torch's own nn.TransformerEncoder."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import op_count


@pytest.mark.parametrize("sketch_dim", [64, 16])  # 64 = the width (no sketch); 16 sketches
@pytest.mark.parametrize("variant", ["weak", "strong"])
def test_extra_ops_per_step_within_budget(variant, sketch_dim):
    per_layer, constant = op_count.TARGETS[variant]
    for depth in (6, 12):
        extra = sum(op_count.extra_ops(variant, depth, sketch_dim).values())
        assert extra <= per_layer * depth + constant, (variant, depth, extra)


def test_layers_cost_a_fixed_handful_of_ops_each():
    """Pooling forward and backward, the stack's slice, the gradient sum: no per-layer
    regularizer kernels are left (before batching: 38 weak, 52 strong)."""
    totals = {d: sum(op_count.extra_ops("strong", d, 64).values()) for d in (2, 3)}
    assert totals[3] - totals[2] == 5


def test_host_time_runs_every_variant():
    """op_count.py --time's plumbing (the times themselves are not asserted: timed tests are
    not kept here)."""
    res = op_count.host_time(depth=2, sketch_dim=16, rounds=2, steps=2)
    assert res["none_us"] > 0
    assert set(res) == {"none_us", *op_count.VARIANTS}
    assert all(isinstance(res[v]["extra_us"], float) for v in op_count.VARIANTS)
