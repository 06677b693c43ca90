"""The aten ops one training step gains from attach (the CPU-side measure of GPU launch
cost), counted, not timed: issue 9's budget on torch's own nn.TransformerEncoder."""

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
