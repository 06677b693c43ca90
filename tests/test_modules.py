"""WeakSIGReg / StrongSIGReg modules: sketch policies, state_dict, validation."""

import pytest
import torch

import sigreg


def test_fixed_sketch_is_drawn_once_and_round_trips_through_state_dict():
    reg = sigreg.WeakSIGReg(sketch_dim=8, sketch="fixed", seed=5)
    z = torch.randn(64, 32)
    first = reg(z)
    sketch = reg.projection.clone()
    assert sketch.shape == (32, 8)
    assert torch.equal(reg(z), first)  # same sketch again
    fresh = sigreg.WeakSIGReg(sketch_dim=8, sketch="fixed", seed=99)
    fresh.load_state_dict(reg.state_dict())
    assert torch.equal(fresh.projection, sketch)
    assert torch.equal(fresh(z), first)


def test_fixed_sketch_rejects_other_width():
    reg = sigreg.WeakSIGReg(sketch_dim=4, sketch="fixed")
    reg(torch.randn(16, 10))
    with pytest.raises(ValueError, match="width"):
        reg(torch.randn(16, 11))


def test_resample_draws_new_sketch_each_call_reproducibly():
    z = torch.randn(64, 32)
    a, b = sigreg.WeakSIGReg(8, seed=1), sigreg.WeakSIGReg(8, seed=1)
    va = [a(z).item() for _ in range(3)]
    vb = [b(z).item() for _ in range(3)]
    assert va == vb
    assert len(set(va)) == 3
    assert sigreg.WeakSIGReg(8, seed=2)(z).item() != va[0]


def test_resample_counter_resumes_from_state_dict():
    z = torch.randn(64, 32)
    a = sigreg.StrongSIGReg(8, seed=3)
    a(z)
    state = a.state_dict()
    expected = a(z)
    b = sigreg.StrongSIGReg(8, seed=3)
    b.load_state_dict(state)
    assert torch.equal(b(z), expected)


def test_no_sketch_when_width_at_most_k():
    z = torch.randn(64, 16)
    for policy in ("fixed", "resample"):
        assert sigreg.WeakSIGReg(64, sketch=policy)(z).item() == pytest.approx(
            sigreg.weak_sigreg(z).item()
        )
    assert sigreg.WeakSIGReg(None)(z).item() == pytest.approx(sigreg.weak_sigreg(z).item())


def test_constructor_validation():
    with pytest.raises(ValueError, match="policy"):
        sigreg.WeakSIGReg(sketch="sometimes")
    with pytest.raises(ValueError, match="sketch_dim"):
        sigreg.WeakSIGReg(0)
    with pytest.raises(TypeError, match="sketch_dim"):
        sigreg.WeakSIGReg(2.5)
    with pytest.raises(ValueError, match="t_max"):
        sigreg.StrongSIGReg(t_max=0)
    with pytest.raises(ValueError, match="num_points"):
        sigreg.StrongSIGReg(num_points=1)
    with pytest.raises(ValueError, match="variant"):
        sigreg.make_regularizer("medium")
    with pytest.raises(ValueError, match="2-D"):
        sigreg.WeakSIGReg()(torch.randn(5))


def test_module_gradients_flow():
    z = torch.randn(32, 20, requires_grad=True)
    (sigreg.WeakSIGReg(8)(z) + sigreg.StrongSIGReg(8)(z)).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_vicreg_module_validates_and_ignores_projection_settings():
    from sigreg import VarCovReg, make_regularizer

    for bad in ({"gamma": 0.0}, {"var_weight": -1.0}, {"var_weight": 0.0, "cov_weight": 0.0},
                {"eps": 0.0}):
        with pytest.raises(ValueError):
            VarCovReg(**bad)
    reg = make_regularizer("vicreg", 16, sketch="fixed", seed=3, var_weight=2.0)
    assert isinstance(reg, VarCovReg) and reg.var_weight == 2.0
    z = torch.randn(32, 6)
    assert reg(z).item() == pytest.approx(
        sigreg.vicreg_varcov(z, var_weight=2.0).item(), rel=1e-6)
    assert reg.state_dict() == {}  # nothing random to save
    with pytest.raises(ValueError, match="unknown regularizer variant"):
        make_regularizer("vicreg2")
