"""attach(): layer selection, pooling, hooks, combining, and real model kinds."""

import pytest
import torch
from torch import nn

import sigreg


def mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def convnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def test_mlp_preactivations_value_equals_manual_computation():
    torch.manual_seed(0)
    model = mlp()
    handle = sigreg.attach(model, ["0", "2"], sketch_dim=None)
    x = torch.randn(40, 12)
    model(x)
    h1 = model[0](x)
    h2 = model[2](model[1](h1))
    expected = (sigreg.weak_sigreg(h1) + sigreg.weak_sigreg(h2)) / 2
    assert handle.loss().item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(handle.layer_losses()) == {"0", "2"}


def test_layer_specs_name_glob_type_predicate():
    model = mlp()
    assert sigreg.resolve_layers(model, nn.Linear) == ["0", "2", "4"]
    assert sigreg.resolve_layers(model, "[02]") == ["0", "2"]
    assert sigreg.resolve_layers(model, lambda n, m: isinstance(m, nn.ReLU)) == ["1", "3"]
    assert sigreg.resolve_layers(model, ["4", nn.ReLU]) == ["1", "3", "4"]
    with pytest.raises(ValueError, match="matches no module"):
        sigreg.attach(model, ["0", "blocks.*"])
    with pytest.raises(ValueError, match="empty"):
        sigreg.attach(model, [])
    with pytest.raises(ValueError, match="pool"):
        sigreg.attach(model, "0", pool="max")


def test_transformer_encoder_token_mean():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    handle = sigreg.attach(model, "layers.*", variant="strong", sketch_dim=16, keep_features=True)
    assert handle.names == ["layers.0", "layers.1", "layers.2"]
    x = torch.randn(8, 10, 32)
    out = model(x)
    loss = handle.combine(out.pow(2).mean())
    loss.backward()
    feats = handle.features()
    assert feats["layers.2"].shape == (8, 32)
    assert torch.allclose(feats["layers.2"], out.mean(1).detach())
    assert all(p.grad is not None for p in model.parameters())


def test_conv_maps_are_averaged_over_space():
    model = convnet()
    handle = sigreg.attach(model, nn.Conv2d, keep_features=True)
    x = torch.randn(6, 3, 8, 8)
    model(x)
    handle.loss()
    assert handle.features()["2"].shape == (6, 16)
    assert torch.allclose(handle.features()["0"], model[0](x).mean((2, 3)))


def test_pool_variants_and_tuple_outputs():
    x = torch.randn(4, 5, 6)
    assert sigreg.pool_features(x, "flatten").shape == (20, 6)
    assert torch.equal(sigreg.pool_features(x, "cls"), x[:, 0])
    assert torch.equal(sigreg.pool_features((x, None), "mean"), x.mean(1))
    assert torch.equal(sigreg.pool_features((x, 1), lambda out: out[0][:, -1]), x[:, -1])
    video = torch.randn(2, 3, 4, 5, 6)  # (B, C, D, H, W): the mean over D, H, W
    torch.testing.assert_close(sigreg.pool_features(video, "mean"), video.mean((2, 3, 4)))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 5, 6\).*pool=\) a callable"):
        sigreg.pool_features(video, "flatten")


def test_no_work_in_eval_or_no_grad_and_loss_needs_forward():
    model = mlp()
    handle = sigreg.attach(model, nn.Linear)
    with pytest.raises(RuntimeError, match="forward"):
        handle.loss()
    with torch.no_grad():
        model(torch.randn(4, 12))
    model.eval()
    model(torch.randn(4, 12))
    with pytest.raises(RuntimeError):
        handle.loss()
    model.train()
    model(torch.randn(4, 12))
    handle.loss()
    with pytest.raises(RuntimeError):
        handle.loss()  # consumed


def test_remove_detaches_hooks():
    model = mlp()
    handle = sigreg.attach(model, nn.Linear)
    handle.remove()
    model(torch.randn(4, 12))
    with pytest.raises(RuntimeError):
        handle.loss()
    assert all(not m._forward_hooks for m in model.modules())


def test_combine_conventions():
    model = mlp()
    x = torch.randn(16, 12)
    for kwargs, expect in (({"alpha": 0.25}, lambda t, r: 0.75 * t + 0.25 * r),
                           ({"lam": 2.0}, lambda t, r: t + 2.0 * r)):
        handle = sigreg.attach(model, "0", sketch_policy="fixed", **kwargs)
        model(x)
        total = handle.combine(torch.tensor(1.0))
        model(x)
        assert total.item() == pytest.approx(expect(1.0, handle.loss().item()), rel=1e-6)
        handle.remove()


def test_weight_shared_layer_contributes_mean_of_calls():
    lin = nn.Linear(6, 6)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    handle = sigreg.attach(model, "0", sketch_dim=None)
    x = torch.randn(30, 6)
    model(x)
    with torch.no_grad():  # a direct call of the layer would be a training step of its own
        a = lin(x)
        expected = (sigreg.weak_sigreg(a) + sigreg.weak_sigreg(lin(torch.tanh(a)))) / 2
    assert handle.loss().item() == pytest.approx(expected.item(), rel=1e-5)


def test_handle_state_dict_restores_sketch_stream():
    model = mlp()
    x = torch.randn(16, 12)
    h1 = sigreg.attach(model, nn.Linear, sketch_dim=4)
    model(x)
    h1.loss()
    state = h1.state_dict()
    model(x)
    expected = h1.loss()
    h1.remove()
    h2 = sigreg.attach(model, nn.Linear, sketch_dim=4)
    h2.load_state_dict(state)
    model(x)
    assert torch.equal(h2.loss(), expected)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = mlp()
    handle = sigreg.attach(model, nn.Linear, sketch_policy="fixed")
    x = torch.randn(16, 12)
    model(x)
    eager = handle.loss()
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(3):  # several steps: no recompilation error, same value
        compiled(x)
        value = handle.loss()
        assert value.item() == pytest.approx(eager.item(), rel=1e-5)
    value.backward()
    assert model[0].weight.grad is not None


def test_glob_star_stays_within_one_name_component():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 2))
    assert sigreg.resolve_layers(model, "0.*") == ["0.0", "0.1"]
    assert sigreg.resolve_layers(model, "*") == ["0", "1"]
    assert sigreg.resolve_layers(model, "**") == ["0", "0.0", "0.1", "1"]


def test_feature_recorder_records_only_while_on_and_in_eval_too():
    model = convnet().eval()
    rec = sigreg.FeatureRecorder(model, nn.Conv2d)
    x = torch.randn(5, 3, 8, 8)
    model(x)
    assert rec.features == {}
    with torch.no_grad(), rec.recording():
        model(x)
    assert rec.features["0"].shape == (5, 8)
    assert torch.allclose(rec.features["0"], model[0](x).mean((2, 3)))
    rec.remove()
    assert all(not m._forward_hooks for m in model.modules())
