"""SIGRegHandle: the batched regularizer of all layers equals the per-layer functional
definition on the same sketches; the handle's state (latest forward, accumulation, bounded
memory, resume); argument checks at construction."""

import contextlib
import math
import warnings

import pytest
import torch
from torch import nn

import sigreg
from sigreg.sketch import mix_seed

K = 8
FUNCTIONS = {
    "weak": lambda z, p: sigreg.weak_sigreg(z, p),
    "strong": lambda z, p: sigreg.strong_sigreg(z, p, 3.0, 17),
    "vicreg": lambda z, p: sigreg.vicreg_varcov(z),
}
DRAWS = {"weak": sigreg.draw_sketch, "strong": sigreg.draw_directions}


def mixed_widths(dtype=torch.float32) -> nn.Module:
    """Linear layers of widths 32, 32, 16, 3: three groups, one of them narrower than K."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def projection(variant, policy, seed, step, layer, width, group):
    """The sketch the handle documents for one call: fixed, layer i's from seed + i on the
    CPU; resampled, row j of its group's draw from (seed, step, group number)."""
    if variant == "vicreg" or (variant == "weak" and K >= width):
        return None
    draw = DRAWS[variant]
    if policy == "fixed":
        return draw(width, K, sigreg.seeded_generator(seed + layer))
    ordinal, row, size = group
    gen = sigreg.seeded_generator(mix_seed(mix_seed(seed, step), ordinal))
    return draw(width, K, gen, batch=size)[row]


def reference(variant, policy, seed, step, calls):
    """Per-layer functional values: calls is [(layer, features)] in call order."""
    widths = list(dict.fromkeys((f.shape, f.dtype) for _, f in calls))
    groups = {key: [i for i, (_, f) in enumerate(calls) if (f.shape, f.dtype) == key]
              for key in widths}
    values = {}
    for ordinal, members in enumerate(groups.values()):
        for row, i in enumerate(members):
            layer, f = calls[i]
            p = projection(variant, policy, seed, step, layer, f.shape[1],
                           (ordinal, row, len(members)))
            values.setdefault(layer, []).append(FUNCTIONS[variant](f, p))
    return {layer: torch.stack(v).mean() for layer, v in values.items()}


@contextlib.contextmanager
def recording(model, layer_indices):
    """Collects (layer number, output) of every call of model[i] for i in layer_indices."""
    calls = []
    hooks = [model[i].register_forward_hook(lambda m, a, out, n=n: calls.append((n, out)))
             for n, i in enumerate(layer_indices)]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("policy", ["resample", "fixed"])
@pytest.mark.parametrize("variant", ["weak", "strong", "vicreg"])
def test_batched_equals_per_layer_definition_mixed_widths(variant, policy, dtype, rel):
    model = mixed_widths(dtype)
    handle = sigreg.attach(model, nn.Linear, variant, K, sketch_policy=policy, seed=3)
    x = torch.randn(24, 12, dtype=dtype)
    for step in range(2):  # the second step: the next resampled draw, the same fixed one
        with recording(model, [0, 2, 4, 6]) as calls:
            model(x)
        loss = handle.loss()
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        expected = reference(variant, policy, 3, step, calls)
        ref_loss = torch.stack(list(expected.values())).mean()
        ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
        values = handle.layer_loss_tensors()
        assert list(values) == ["0", "2", "4", "6"]
        for n, name in enumerate(values):
            torch.testing.assert_close(values[name], expected[n].detach(), rtol=rel, atol=0)
        torch.testing.assert_close(loss, ref_loss, rtol=rel, atol=0)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=rel * 10, atol=rel * 1e-2)


@pytest.mark.parametrize("variant", ["weak", "strong"])
def test_sketch_dim_per_layer_equals_the_per_layer_definition(variant):
    """Layers 0 and 2 have the same width but different K: separate groups, each layer with
    its own fixed K-column projection from seed + i."""
    model = mixed_widths()
    dims = {"0": 4, "2": 8, "**": 6}
    handle = sigreg.attach(model, nn.Linear, variant, dims, sketch_policy="fixed", seed=3)
    x = torch.randn(24, 12)
    with recording(model, [0, 2, 4, 6]) as calls:
        model(x)
    handle.loss()
    values = handle.layer_loss_tensors()
    assert sorted(values) == ["0", "2", "4", "6"]
    for n, f in calls:
        k = {0: 4, 1: 8}.get(n, 6)
        width = f.shape[1]
        p = None if variant == "weak" and k >= width else DRAWS[variant](
            width, k, sigreg.seeded_generator(3 + n))
        expected = FUNCTIONS[variant](f, p)
        torch.testing.assert_close(values[str(2 * n)], expected.detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("policy", ["resample", "fixed"])
def test_one_sketch_dim_for_every_layer_is_the_plain_sketch_dim(policy):
    model, x = mixed_widths(), torch.randn(24, 12)
    plain = sigreg.attach(model, nn.Linear, "weak", K, sketch_policy=policy, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two handles on one model, on purpose
        mapped = sigreg.attach(model, nn.Linear, "weak", {"**": K}, sketch_policy=policy, seed=2)
    for _ in range(2):
        model(x)
        assert torch.equal(plain.loss(), mapped.loss())


def test_sketch_dim_per_layer_state_resumes_exactly():
    model, x = mixed_widths(), torch.randn(24, 12)
    dims = {"0": 4, "**": 8}
    first = sigreg.attach(model, nn.Linear, "strong", dims, sketch_policy="fixed", seed=5)
    model(x)
    first.loss()
    state = first.state_dict()
    assert {n: t.shape[1] for n, t in state["fixed"].items()} == {"0": 4, "2": 8, "4": 8, "6": 8}
    model(x)
    expected = first.loss()
    first.remove()
    resumed = sigreg.attach(model, nn.Linear, "strong", dims, sketch_policy="fixed", seed=99)
    resumed.load_state_dict(state)  # the saved sketches, not seed 99's
    model(x)
    assert torch.equal(resumed.loss(), expected)


@pytest.mark.parametrize("policy", ["resample", "fixed"])
def test_layer_called_twice_is_the_mean_of_its_calls(policy):
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(16, 16))
    handle = sigreg.attach(model, ["0", "4"], "strong", K, sketch_policy=policy, seed=1)
    with recording(model, [0, 4]) as calls:  # model[0] is model[2]: [(0, ..), (0, ..), (1, ..)]
        model(torch.randn(20, 16))
    handle.loss()
    values = handle.layer_losses()
    expected = reference("strong", policy, 1, 0, calls)
    assert values["0"] == pytest.approx(expected[0].item(), rel=1e-5)
    assert values["4"] == pytest.approx(expected[1].item(), rel=1e-5)


def test_bf16_autocast_features_give_the_per_layer_values():
    model = mixed_widths()
    handle = sigreg.attach(model, nn.Linear, "weak", K, sketch_policy="fixed", keep_features=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(24, 12))
    handle.loss()
    values = handle.layer_losses()
    features = handle.features()
    assert all(f.dtype == torch.bfloat16 for f in features.values())
    for i, (name, f) in enumerate(features.items()):
        p = projection("weak", "fixed", 0, 0, i, f.shape[1], None)
        assert values[name] == pytest.approx(sigreg.weak_sigreg(f, p).item(), rel=1e-5)


def test_token_mean_pooling_inside_the_batch():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    handle = sigreg.attach(model, "layers.*", "weak", K, sketch_policy="fixed", keep_features=True)
    x = torch.randn(6, 5, 16)
    model(x)
    handle.loss()
    values = handle.layer_losses()
    h = x
    for i, blk in enumerate(model.layers):
        h = blk(h)
        torch.testing.assert_close(handle.features()[f"layers.{i}"], h.mean(1).detach())
        p = projection("weak", "fixed", 0, 0, i, 16, None)
        assert values[f"layers.{i}"] == pytest.approx(sigreg.weak_sigreg(h.mean(1), p).item(),
                                                      rel=1e-5)


# ---- state: latest forward, accumulation, bounded memory ---------------------------------

def issue_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 3))


def test_loss_covers_the_latest_forward_and_two_forwards_raise():
    model, x = issue_mlp(), torch.randn(32, 8)
    handle = sigreg.attach(model, nn.Linear, sketch_policy="fixed")
    model(x)
    one = handle.loss().item()
    model(x * 100)
    model(x)
    with pytest.raises(RuntimeError, match="2 training forward passes ran since the last loss"):
        handle.loss()
    model(x)  # the error dropped the old passes: the next step works
    assert handle.loss().item() == pytest.approx(one, rel=1e-6)


def test_accumulate_averages_the_forwards_since_the_last_loss():
    model, x = issue_mlp(), torch.randn(32, 8)
    handle = sigreg.attach(model, nn.Linear, sketch_policy="fixed", accumulate=2)
    values = []
    for scale in (100.0, 1.0):
        model(x * scale)
        values.append(handle.loss().item())
    model(x * 100)
    model(x)
    assert handle.loss().item() == pytest.approx(sum(values) / 2, rel=1e-5)
    model(x)  # fewer than `accumulate` forwards is fine (a last partial accumulation)
    assert handle.loss().item() == pytest.approx(values[1], rel=1e-6)
    for _ in range(3):
        model(x)
    with pytest.raises(RuntimeError, match="accumulate"):
        handle.loss()


def test_a_handle_never_asked_keeps_one_forward_at_most():
    model, x = issue_mlp(), torch.randn(16, 8)
    sigreg.attach(model, nn.Linear)
    with pytest.warns(UserWarning, match="already regularized"):
        idle = sigreg.attach(model, nn.Linear)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert len(idle._capture.passes) == 1 and len(idle._capture.passes[0]) == 3


def test_a_step_without_loss_gives_a_clear_error_then_clear_recovers():
    model, x = issue_mlp(), torch.randn(16, 8)
    handle = sigreg.attach(model, nn.Linear)
    model(x).square().mean().backward()  # a step that skipped the regularizer
    task = model(x).square().mean()
    with pytest.raises(RuntimeError, match=r"handle.clear\(\)"):
        handle.combine(task)
    model(x).square().mean().backward()
    handle.clear()
    handle.combine(model(x).square().mean()).backward()  # no "backward through the graph twice"


def test_attaching_twice_warns_once_removed_not():
    model = issue_mlp()
    first = sigreg.attach(model, nn.Linear)
    with pytest.warns(UserWarning, match=r"\['0', '2'\] are already regularized"):
        sigreg.attach(model, "[02]").remove()
    first.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigreg.attach(model, nn.Linear)


# ---- resume ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, policy", [("weak", "resample"), ("weak", "fixed"),
                                             ("strong", "resample"), ("strong", "fixed")])
def test_state_dict_resumes_the_sketch_stream_exactly(variant, policy):
    model, x = mixed_widths(), torch.randn(24, 12)
    first = sigreg.attach(model, nn.Linear, variant, K, sketch_policy=policy, seed=5)
    model(x)
    first.loss()
    state = first.state_dict()
    expected = []
    for _ in range(2):
        model(x)
        expected.append(first.loss())
    first.remove()
    resumed = sigreg.attach(model, nn.Linear, variant, K, sketch_policy=policy, seed=5)
    resumed.load_state_dict(state)
    for value in expected:
        model(x)
        assert torch.equal(resumed.loss(), value)


@pytest.mark.parametrize("state, error, message", [
    ({}, ValueError, r"missing keys \['fixed', 'step'\]"),
    ({"step": 0}, ValueError, "missing keys"),
    ({"step": 0, "fixed": {}, "extra": 1}, ValueError, "unknown keys"),
    ({"step": -1, "fixed": {}}, ValueError, "step"),
    ({"step": 0, "fixed": {"9": torch.randn(4, K)}}, ValueError, "'9'"),
    ({"step": 0, "fixed": {"0": torch.randn(32, K + 1)}}, ValueError, r"\(C, 8\)"),
    ([], TypeError, "dict"),
])
def test_load_state_dict_rejects_bad_states(state, error, message):
    handle = sigreg.attach(mixed_widths(), nn.Linear, "weak", K, sketch_policy="fixed")
    with pytest.raises(error, match=message):
        handle.load_state_dict(state)


def test_fixed_sketches_do_not_load_into_a_resampling_handle():
    model = mixed_widths()
    fixed = sigreg.attach(model, nn.Linear, "weak", K, sketch_policy="fixed")
    model(torch.randn(24, 12))
    fixed.loss()
    fixed.remove()
    with pytest.raises(ValueError, match="fixed sketches"):
        sigreg.attach(model, nn.Linear, "weak", K).load_state_dict(fixed.state_dict())


# ---- arguments are checked when attaching ---------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({"sketch_dim": 2.5}, TypeError, "sketch_dim"),
    ({"sketch_dim": "64"}, TypeError, "sketch_dim"),
    ({"sketch_dim": 0}, ValueError, "sketch_dim"),
    ({"sketch_dim": True}, TypeError, "sketch_dim"),
    ({"lam": math.inf}, ValueError, "lam"),
    ({"lam": math.nan}, ValueError, "lam"),
    ({"lam": -1.0}, ValueError, "lam"),
    ({"alpha": 1.5}, ValueError, "alpha"),
    ({"alpha": "0.1"}, TypeError, "alpha"),
    ({"alpha": 0.1, "lam": 1.0}, ValueError, "exactly one"),
    ({"variant": "medium"}, ValueError, "variant"),
    ({"sketch_policy": "sometimes"}, ValueError, "sketch_policy"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"pool": "max"}, ValueError, "pool"),
    ({"pool": 3}, TypeError, "pool"),
    ({"distributed": "yes"}, TypeError, "distributed"),
    ({"keep_features": "no"}, TypeError, "keep_features"),
    ({"accumulate": 0}, ValueError, "accumulate"),
    ({"accumulate": 2.0}, TypeError, "accumulate"),
    ({"compile": "yes"}, TypeError, "compile"),
    ({"variant": "strong", "t_max": 0.0}, ValueError, "t_max"),
    ({"variant": "strong", "t_max": math.inf}, ValueError, "t_max"),
    ({"variant": "strong", "num_points": 2.5}, TypeError, "num_points"),
    ({"variant": "strong", "num_points": 1}, ValueError, "num_points"),
    ({"variant": "weak", "t_max": 3.0}, TypeError, "t_max"),
    ({"foo": 1}, TypeError, "foo"),
    ({"variant": "vicreg", "gamma": 0.0}, ValueError, "gamma"),
    ({"variant": "vicreg", "eps": math.nan}, ValueError, "eps"),
    ({"layers": 3}, TypeError, "layer spec"),
    ({"sketch_dim": {"0": 4}}, ValueError, "matches no key of sketch_dim"),
    ({"sketch_dim": {"**": 4, "9": 2}}, ValueError, "match none of the regularized layers"),
    ({"sketch_dim": {}}, ValueError, "empty mapping"),
    ({"sketch_dim": {"0": 4, "**": 0}}, ValueError, "sketch_dim"),
    ({"sketch_dim": {42: 16}}, TypeError, r"sketch_dim's keys are layer specs .*got the key 42"),
    ({"sketch_dim": {"0": 4, None: 16}}, TypeError, "got the key None"),
    ({"sketch_dim": {"**": 4, "2": 8}}, ValueError,
     (r"sketch_dim key '2' matches \['2'\], but each layer takes the first key that matches "
      r"it, and '\*\*' comes first: put '2' before '\*\*'")),
])
def test_bad_arguments_raise_when_attaching(kwargs, error, message):
    kwargs = {"layers": nn.Linear, **kwargs}
    with pytest.raises(error, match=message):
        sigreg.attach(issue_mlp(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model"):
        sigreg.attach(lambda x: x, "0")


# ---- compile ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["weak", "strong"])
def test_compiled_regularizer_and_model_match_eager(variant):
    """attach(compile=...) compiles the batched regularizer; with the model compiled too (as
    the trainer's compile=true does) the values and gradients stay those of eager."""
    eager_model, compiled_model, x = mixed_widths(), mixed_widths(), torch.randn(24, 12)
    eager = sigreg.attach(eager_model, nn.Linear, variant, K, seed=2)
    compiled = sigreg.attach(compiled_model, nn.Linear, variant, K, seed=2,
                             compile={"backend": "aot_eager"})
    net = torch.compile(compiled_model, backend="aot_eager")
    for _ in range(3):  # resampled sketches: new tensors of the same shape, no recompiling
        eager_model.zero_grad()
        compiled_model.zero_grad()
        eager_model(x)
        expected = eager.loss()
        expected.backward()
        net(x)
        got = compiled.loss()
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)


def test_forwards_that_record_nothing_do_not_count():
    model, x = issue_mlp(), torch.randn(16, 8)
    handle = sigreg.attach(model, nn.Linear)
    model.eval()
    model(x)  # eval mode, autograd on: nothing recorded, not a training forward
    model.train()
    with torch.no_grad():
        model(x)
    model(x)
    handle.loss()  # one training forward: no error


def test_a_layer_rerun_in_backward_is_not_a_forward():
    """Activation checkpointing recomputes layers inside backward (autograd on, training):
    those calls must not count as a forward of the next step."""
    model, x = issue_mlp(), torch.randn(16, 8)
    handle = sigreg.attach(model, nn.Linear, sketch_policy="fixed")

    def checkpointed(inp):
        return torch.utils.checkpoint.checkpoint(model, inp, use_reentrant=False)

    expected = None
    for _ in range(2):
        out = checkpointed(x)
        loss = handle.loss()
        (out.square().mean() + loss).backward()  # recomputes the layers, hooks included
        expected = loss if expected is None else expected
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
