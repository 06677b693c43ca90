"""weak SIGReg with ``scale_invariant=True``: || Cov(Z S / max(1, r)) - I ||_F, r the root mean
square of Z S (mean included, not differentiated). Above unit power its value does not change
with Z's scale, below it is the paper's; it matches the reference definition in values and
gradients, and it reaches attach and the trainer's setting. (Two ranks against one process:
tests/test_distributed.py.)"""

import pytest
import torch
from torch import nn

import sigreg
from sigreg.reference import weak_sigreg_reference
from sigreg.train.config import TrainConfig, apply_overrides


def features(*shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    # A common mean larger than the spread, as a residual stream has.
    return (torch.randn(*shape, generator=gen) + 3.0).to(dtype)


@pytest.mark.parametrize("sketched", [True, False])
@pytest.mark.parametrize("stack", [(), (3,)])
def test_above_unit_power_the_value_does_not_change_with_the_scale(sketched, stack):
    z = features(*stack, 200, 16)  # root mean square about 3 (sketched: about 3 too)
    sketch = sigreg.draw_sketch(16, 6, sigreg.seeded_generator(1), batch=stack) if sketched else None
    values = [sigreg.weak_sigreg(c * z, sketch, scale_invariant=True) for c in (1.0, 10.0, 1e3)]
    for v in values[1:]:
        torch.testing.assert_close(v, values[0], rtol=1e-5, atol=0)
    raw = [sigreg.weak_sigreg(c * z, sketch) for c in (1.0, 1e3)]
    assert not torch.allclose(raw[0], raw[1])  # the paper's form does change


@pytest.mark.parametrize("sketched", [True, False])
def test_below_unit_power_it_is_the_papers_loss(sketched):
    z = features(3, 200, 16) * 0.01  # root mean square about 0.03
    sketch = sigreg.draw_sketch(16, 6, sigreg.seeded_generator(1), batch=(3,)) if sketched else None
    torch.testing.assert_close(sigreg.weak_sigreg(z, sketch, scale_invariant=True),
                               sigreg.weak_sigreg(z, sketch), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [40.0, 0.01])  # above and below unit power
@pytest.mark.parametrize("sketched", [True, False])
def test_values_and_gradients_match_the_reference(sketched, scale):
    z = features(3, 64, 12, seed=2, dtype=torch.float64).mul_(scale).requires_grad_()
    sketch = (sigreg.draw_sketch(12, 5, sigreg.seeded_generator(3), batch=(3,)).double()
              if sketched else None)
    fast = sigreg.weak_sigreg(z, sketch, scale_invariant=True)
    (fast_grad,) = torch.autograd.grad(fast.sum(), z)
    ref = weak_sigreg_reference(z, sketch, scale_invariant=True)
    (ref_grad,) = torch.autograd.grad(ref.sum(), z)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-8, atol=1e-12)


def test_it_is_the_unit_form_on_the_features_over_their_rms():
    z = features(128, 10, seed=4) * 7.0
    rms = z.square().mean().sqrt()
    torch.testing.assert_close(sigreg.weak_sigreg(z, scale_invariant=True),
                               sigreg.weak_sigreg(z / rms), rtol=1e-5, atol=0)


def test_a_non_bool_is_refused():
    with pytest.raises(TypeError, match="scale_invariant must be True or False, got 'yes'"):
        sigreg.weak_sigreg(features(8, 4), scale_invariant="yes")
    with pytest.raises(TypeError, match="scale_invariant must be True or False, got 1"):
        sigreg.WeakSIGReg(scale_invariant=1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['scale_invariant'\] for variant "
                                        r"'strong'"):
        sigreg.make_regularizer("strong", 8, scale_invariant=True)


def test_attach_takes_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32))
    x = torch.randn(64, 8)
    values = {}
    for scale in (100.0, 1e3):
        with torch.no_grad():  # the layer's output times 100, then 1e5: above unit power
            model[2].weight.mul_(scale)
            model[2].bias.mul_(scale)
        handle = sigreg.attach(model, ["2"], sketch_dim=8, alpha=0.1, scale_invariant=True)
        model(x)
        values[scale] = handle.loss().item()
        handle.remove()
    assert values[1e3] == pytest.approx(values[100.0], rel=1e-4)


def test_the_trainer_setting_is_checked_before_anything_runs():
    cfg = apply_overrides(TrainConfig(sigreg="weak"), ["scale_invariant=true"])
    assert cfg.scale_invariant is True
    with pytest.raises(ValueError, match="scale_invariant applies to sigreg=weak only, got "
                                         "sigreg=strong"):
        apply_overrides(TrainConfig(sigreg="strong"), ["scale_invariant=true"])


def test_it_compiles_into_one_graph():
    """torch.compile(fullgraph=True): the scale adds no graph break."""
    torch._dynamo.reset()
    z = features(2, 64, 12, seed=5).mul_(30.0).requires_grad_()
    sketch = sigreg.draw_sketch(12, 4, sigreg.seeded_generator(6), batch=(2,))

    def loss(z):
        return sigreg.weak_sigreg(z, sketch, scale_invariant=True, distributed=False).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (want,) = torch.autograd.grad(loss(z), z)
    got_value = compiled(z)
    (got,) = torch.autograd.grad(got_value, z)
    torch.testing.assert_close(got_value, loss(z), rtol=1e-5, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
