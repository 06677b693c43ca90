"""Renamed keywords and settings (one name per concept): ``num_directions`` -> ``sketch_dim``,
``sketch`` (the policy) -> ``sketch_policy``. Each old name still works for one release: it
warns (FutureWarning, naming the new one), gives exactly what the new name gives, and
clashes with the new name given too (TypeError)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

import sigreg
from sigreg.train.config import TrainConfig, apply_overrides

Z = torch.randn(3, 40, 12, generator=torch.Generator().manual_seed(0))


def renamed(old: str, new: str):
    return pytest.warns(FutureWarning, match=rf"'{old}' is deprecated .* use '{new}'")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16))


def handle_values(handle: sigreg.SIGRegHandle, model: nn.Module) -> list[torch.Tensor]:
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(1))
    values = []
    for _ in range(2):  # two steps: a resampled sketch changes between them, a fixed one not
        model(x)
        values.append(handle.loss().detach())
    return values


# ---- functions and modules: old keyword = new keyword, with a warning ----------------------

def test_strong_sigreg_num_directions():
    new = sigreg.strong_sigreg(Z, sketch_dim=5, generator=sigreg.seeded_generator(3))
    with renamed("num_directions", "sketch_dim"):
        old = sigreg.strong_sigreg(Z, num_directions=5, generator=sigreg.seeded_generator(3))
    assert torch.equal(old, new)


def test_draw_directions_num_directions():
    new = sigreg.draw_directions(12, sketch_dim=6, generator=sigreg.seeded_generator(2))
    with renamed("num_directions", "sketch_dim"):
        old = sigreg.draw_directions(12, num_directions=6, generator=sigreg.seeded_generator(2))
    assert old.shape == (12, 6) and torch.equal(old, new)


@pytest.mark.parametrize("policy", ["resample", "fixed"])
@pytest.mark.parametrize("module", [sigreg.WeakSIGReg, sigreg.StrongSIGReg])
def test_module_sketch(module, policy):
    new = module(4, sketch_policy=policy, seed=5)
    with renamed("sketch", "sketch_policy"):
        old = module(4, sketch=policy, seed=5)
    assert old.sketch_policy == policy
    assert repr(old) == repr(new)
    for _ in range(2):
        assert torch.equal(old(Z), new(Z))
    assert old.state_dict().keys() == new.state_dict().keys()


def test_strong_module_num_directions():
    new = sigreg.StrongSIGReg(sketch_dim=6, seed=1)
    with renamed("num_directions", "sketch_dim"):
        old = sigreg.StrongSIGReg(num_directions=6, seed=1)
    assert old.sketch_dim == 6 and torch.equal(old(Z), new(Z))


def test_module_attributes_num_projections_and_policy():
    module = sigreg.WeakSIGReg(4, sketch_policy="fixed")
    with renamed("num_projections", "sketch_dim"):
        assert module.num_projections == 4
    with renamed("policy", "sketch_policy"):
        assert module.policy == "fixed"


@pytest.mark.parametrize("variant", ["weak", "strong", "vicreg"])
def test_make_regularizer_sketch(variant):
    new = sigreg.make_regularizer(variant, 4, sketch_policy="fixed", seed=2)
    with renamed("sketch", "sketch_policy"):
        old = sigreg.make_regularizer(variant, 4, sketch="fixed", seed=2)
    assert repr(old) == repr(new) and torch.equal(old(Z), new(Z))


@pytest.mark.parametrize("policy", ["resample", "fixed"])
@pytest.mark.parametrize("variant", ["weak", "strong"])
def test_attach_sketch(variant, policy):
    model = mlp()
    new = sigreg.attach(model, nn.Linear, variant, 4, sketch_policy=policy, seed=3)
    expected = handle_values(new, model)
    new.remove()
    with renamed("sketch", "sketch_policy"):
        old = sigreg.attach(model, nn.Linear, variant, 4, sketch=policy, seed=3)
    for got, want in zip(handle_values(old, model), expected, strict=True):
        assert torch.equal(got, want)
    assert old.regularizer.sketch_policy == policy


def test_new_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigreg.strong_sigreg(Z, sketch_dim=3)
        sigreg.StrongSIGReg(sketch_dim=3, sketch_policy="fixed")
        sigreg.attach(mlp(), nn.Linear, "weak", 4, sketch_policy="fixed").remove()
        apply_overrides(TrainConfig(), ["sketch_policy=fixed"])


def test_signatures_show_the_new_names():
    for fn, new, old in [(sigreg.attach, "sketch_policy", "sketch"),
                         (sigreg.strong_sigreg, "sketch_dim", "num_directions"),
                         (sigreg.draw_directions, "sketch_dim", "num_directions"),
                         (sigreg.StrongSIGReg, "sketch_dim", "num_directions"),
                         (sigreg.WeakSIGReg, "sketch_policy", "sketch")]:
        params = inspect.signature(fn).parameters
        assert new in params and old not in params


# ---- old and new together: a clear TypeError ----------------------------------------------

@pytest.mark.parametrize(("call", "old", "new"), [
    (lambda: sigreg.strong_sigreg(Z, num_directions=4, sketch_dim=4), "num_directions",
     "sketch_dim"),
    (lambda: sigreg.draw_directions(4, num_directions=2, sketch_dim=2), "num_directions",
     "sketch_dim"),
    (lambda: sigreg.StrongSIGReg(num_directions=4, sketch_dim=4), "num_directions",
     "sketch_dim"),
    (lambda: sigreg.StrongSIGReg(4, sketch="fixed", sketch_policy="fixed"), "sketch",
     "sketch_policy"),
    (lambda: sigreg.WeakSIGReg(4, sketch="fixed", sketch_policy="fixed"), "sketch",
     "sketch_policy"),
    (lambda: sigreg.make_regularizer("weak", 4, sketch="fixed", sketch_policy="fixed"), "sketch",
     "sketch_policy"),
    (lambda: sigreg.attach(mlp(), nn.Linear, sketch="fixed", sketch_policy="fixed"), "sketch",
     "sketch_policy"),
])
def test_old_and_new_together_raise(call, old, new):
    with pytest.raises(TypeError, match=rf"got both '{old}' \(deprecated\) and '{new}'; give "
                                        rf"only '{new}'"):
        call()


# ---- the trainer's setting ---------------------------------------------------------------

def test_set_sketch_is_sketch_policy():
    with renamed("sketch", "sketch_policy"):
        old = apply_overrides(TrainConfig(), ["sketch=fixed"])
    assert old == apply_overrides(TrainConfig(), ["sketch_policy=fixed"])
    assert old.sketch_policy == "fixed"


def test_set_refuses_the_old_and_the_new_name_together():
    with pytest.raises(ValueError, match=r"--set got both 'sketch' \(deprecated\) and "
                                         r"'sketch_policy'; give only 'sketch_policy'"):
        apply_overrides(TrainConfig(), ["sketch=fixed", "sketch_policy=resample"])


def test_the_command_prints_the_rename_as_one_line(tmp_path, capsys):
    """The command line prints warnings as it prints errors: one ``sigreg: warning:`` line
    (not Python's two, the second the source line that warned)."""
    from sigreg.train import cli
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "fmnist-mlp-d10-weak", "--out", str(out),
                     "--no-progress", "--set", "sketch=fixed", "dataset=synthetic", "epochs=1",
                     "num_train=64", "num_test=64", "batch_size=32", "device=cpu"]) == 0
    err = capsys.readouterr().err
    assert ("sigreg: warning: --set: the setting 'sketch' is deprecated and will be removed in "
            "the next release; use 'sketch_policy' (same meaning, same values)\n") in err
    assert "FutureWarning" not in err and "warnings.warn" not in err


def test_config_saved_before_the_rename_loads():
    """A config as the version before the rename wrote it (checkpoints, config.json)."""
    saved = TrainConfig(sigreg="weak", sketch_policy="fixed").to_dict()
    saved["sketch"] = saved.pop("sketch_policy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = TrainConfig.from_dict(saved)
    assert loaded == TrainConfig(sigreg="weak", sketch_policy="fixed")
    with pytest.raises(ValueError, match="both 'sketch' and 'sketch_policy'"):
        TrainConfig.from_dict({**saved, "sketch_policy": "fixed"})


# ---- the integrations take attach's settings: the old keyword there too -------------------

def test_lightning_callback_sketch():
    lightning = pytest.importorskip("sigreg.integrations.lightning")
    with renamed("sketch", "sketch_policy"):
        callback = lightning.SIGRegCallback("0", sketch="fixed")
    assert callback.session.options["sketch_policy"] == "fixed"
    assert "sketch" not in callback.session.options


def test_transformers_settings_sketch():
    transformers = pytest.importorskip("sigreg.integrations.transformers")
    with renamed("sketch", "sketch_policy"):
        options = transformers._checked_keys({"layers": "0", "sketch": "fixed"})
    assert options == {"layers": "0", "sketch_policy": "fixed"}
