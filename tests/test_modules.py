"""WeakSIGReg / StrongSIGReg modules: sketch policies, state_dict, validation."""

import io

import pytest
import torch
from torch import nn

import sigreg

MODULES = {"weak": sigreg.WeakSIGReg, "strong": sigreg.StrongSIGReg}


def fixed_sketches(reg):
    """The fixed sketches a module's state holds, by layer name."""
    return reg.state_dict()["_extra_state"]["fixed"]


def test_fixed_sketch_is_drawn_once_and_round_trips_through_state_dict():
    reg = sigreg.WeakSIGReg(sketch_dim=8, sketch_policy="fixed", seed=5)
    z = torch.randn(64, 32)
    first = reg(z)
    sketch = fixed_sketches(reg)["0"].clone()  # layer "0": the features' only layer
    assert sketch.shape == (32, 8)
    assert torch.equal(reg(z), first)  # same sketch again
    fresh = sigreg.WeakSIGReg(sketch_dim=8, sketch_policy="fixed", seed=99)
    fresh.load_state_dict(reg.state_dict())
    assert torch.equal(fixed_sketches(fresh)["0"], sketch)
    assert torch.equal(fresh(z), first)


@pytest.mark.parametrize("policy", ["fixed", "resample"])
@pytest.mark.parametrize("variant", ["weak", "strong"])
def test_module_and_one_layer_handle_draw_one_stream(variant, policy):
    """The module on a layer's features gives what a one-layer attach with the same seed
    gives, step after step, and holds the same state: one projection stream."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh())
    handle = sigreg.attach(model, "0", variant, 8, sketch_policy=policy, seed=7, keep_features=True)
    module = MODULES[variant](8, sketch_policy=policy, seed=7)
    for _ in range(3):
        model(torch.randn(24, 12))
        handle.loss()
        assert torch.equal(module(handle.features()["0"]), handle.layer_loss_tensors()["0"])
    state, expected = module.state_dict()["_extra_state"], handle.state_dict()
    assert state["step"] == expected["step"] == 3
    assert list(state["fixed"]) == list(expected["fixed"]) == (["0"] if policy == "fixed" else [])
    for name, sketch in expected["fixed"].items():
        assert torch.equal(state["fixed"][name], sketch)


@pytest.mark.parametrize("policy", ["fixed", "resample"])
@pytest.mark.parametrize("variant", ["weak", "strong"])
def test_module_on_a_stack_is_one_group_of_a_handle(variant, policy):
    """A stack (L, N, C) is a handle's L layers of one width: layer i's fixed projection from
    seed + i, the resampled ones of the group drawn at once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 32))
    handle = sigreg.attach(model, nn.Linear, variant, 8, sketch_policy=policy, seed=7,
                           keep_features=True)
    module = MODULES[variant](8, sketch_policy=policy, seed=7)
    for _ in range(2):
        model(torch.randn(24, 12))
        handle.loss()
        stack = torch.stack(list(handle.features().values()))
        expected = torch.stack(list(handle.layer_loss_tensors().values()))
        assert torch.equal(module(stack), expected)


def test_saved_module_round_trips():
    z = torch.randn(64, 32)
    for policy in ("fixed", "resample"):
        reg = sigreg.StrongSIGReg(8, sketch_policy=policy, seed=4)
        reg(z)
        buffer = io.BytesIO()
        torch.save(reg.state_dict(), buffer)
        buffer.seek(0)
        resumed = sigreg.StrongSIGReg(8, sketch_policy=policy, seed=4)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(resumed(z), reg(z))


def test_module_state_rejects_bad_states():
    reg = sigreg.WeakSIGReg(8, sketch_policy="fixed")
    with pytest.raises(ValueError, match="stack positions"):
        reg.load_state_dict({"_extra_state": {"step": 0, "fixed": {"blocks.0": torch.randn(32, 8)}}})
    with pytest.raises(ValueError, match="fixed sketches"):
        sigreg.WeakSIGReg(8).load_state_dict(
            {"_extra_state": {"step": 0, "fixed": {"0": torch.randn(32, 8)}}})


def test_fixed_sketch_rejects_other_width():
    reg = sigreg.WeakSIGReg(sketch_dim=4, sketch_policy="fixed")
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
        assert sigreg.WeakSIGReg(64, sketch_policy=policy)(z).item() == pytest.approx(
            sigreg.weak_sigreg(z).item()
        )
    assert sigreg.WeakSIGReg(None)(z).item() == pytest.approx(sigreg.weak_sigreg(z).item())


def test_constructor_validation():
    with pytest.raises(ValueError, match="policy"):
        sigreg.WeakSIGReg(sketch_policy="sometimes")
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
    reg = make_regularizer("vicreg", 16, sketch_policy="fixed", seed=3, var_weight=2.0)
    assert isinstance(reg, VarCovReg) and reg.var_weight == 2.0
    z = torch.randn(32, 6)
    assert reg(z).item() == pytest.approx(
        sigreg.vicreg_varcov(z, var_weight=2.0).item(), rel=1e-6)
    assert reg.state_dict() == {}  # nothing random to save
    with pytest.raises(ValueError, match="unknown regularizer variant"):
        make_regularizer("vicreg2")
