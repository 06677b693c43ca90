"""`attach` where people really train (issue 17): compiled models, activation checkpointing,
padded batches, ragged last batches, model copies. Layers that run on some ranks only are
in tests/test_distributed.py."""

import copy
import re
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.utils.checkpoint import checkpoint

import sigreg

VARIANTS = ("weak", "strong", "vicreg")


def mlp(depth: int = 6, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU())
                           for _ in range(depth)])


class Blocks(nn.Module):
    """A ModuleList model with its own loop, as transformers are written."""

    def __init__(self, depth: int = 4, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x, reentrant: bool | None = None, skip: tuple = ()):
        for i, block in enumerate(self.blocks):
            if i in skip:
                continue
            if reentrant is None or i == 0:
                x = torch.relu(block(x))
            else:
                x = torch.relu(checkpoint(block, x, use_reentrant=reentrant))
        return x


def sketch_dim(variant):
    return 16 if variant != "vicreg" else None


# ---- torch.compile ----------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("make", [mlp, Blocks], ids=["sequential", "modulelist"])
def test_compiled_model_keeps_one_graph_and_never_recompiles(make, variant):
    """The hooks are traced into the model's graph: as many graphs and ops as without
    attach, fullgraph=True works, and the steps after the first reuse the graph."""
    x = torch.randn(16, 32)
    counts = {}
    for attached in (False, True):
        torch.compiler.reset()
        model, counter = make(), CompileCounter()
        handle = sigreg.attach(model, "**.0" if make is mlp else "blocks.*", variant,
                               sketch_dim(variant)) if attached else None
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for _ in range(3):
            out = compiled(x)
            loss = out.square().mean() + (handle.loss() if handle else 0)
            loss.backward()
        counts[attached] = (counter.frame_count, counter.op_count)
    assert counts[True] == counts[False]
    assert counts[True][0] == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_model_regularizes_like_eager(variant):
    x = torch.randn(16, 32)
    values = []
    for compiled in (False, True):
        torch.compiler.reset()
        model = Blocks()
        handle = sigreg.attach(model, "blocks.*", variant, sketch_dim(variant),
                               sketch_policy="fixed")
        net = torch.compile(model, backend="eager", fullgraph=True) if compiled else model
        net(x)
        handle.loss()
        values.append(handle.layer_losses())
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert len(values[0]) == 4


@pytest.mark.parametrize("make", [mlp, Blocks], ids=["sequential", "modulelist"])
def test_attaching_after_the_compiled_model_ran_works_or_says_what_to_do(make):
    """Whether dynamo's code calls hooks added after it was made depends on the model (and
    the torch version): either the layers are regularized, or loss() names the fix."""
    torch.compiler.reset()
    model, x = make(), torch.randn(8, 32)
    layers = "**.0" if make is mlp else "blocks.*"
    compiled = torch.compile(model, backend="eager")
    compiled(x)
    handle = sigreg.attach(model, layers)
    compiled(x)
    try:
        handle.loss()
    except RuntimeError as error:
        assert re.search(r"attach\(\).*torch\.compiler\.reset\(\)", str(error))
        torch.compiler.reset()
        compiled(x)
        handle.loss()
    assert set(handle.layer_losses()) == set(sigreg.resolve_layers(model, layers))


# ---- activation checkpointing -----------------------------------------------------------

def test_non_reentrant_checkpointing_is_exact_and_not_counted_twice():
    x = torch.randn(16, 32)
    plain, checkpointed = Blocks(), Blocks()
    h_plain = sigreg.attach(plain, "blocks.*", sketch_policy="fixed")
    h_ckpt = sigreg.attach(checkpointed, "blocks.*", sketch_policy="fixed")
    for _ in range(2):  # the recomputation in backward must not leak into the next step
        expected = h_plain.combine(plain(x).square().mean())
        got = h_ckpt.combine(checkpointed(x, reentrant=False).square().mean())
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        assert h_ckpt.layer_losses().keys() == h_plain.layer_losses().keys()
        expected.backward()
        got.backward()
    for p, q in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("layers", ["blocks.*", ["blocks.1", "blocks.2"]],
                         ids=["some-checkpointed", "all-checkpointed"])
def test_reentrant_checkpointing_raises_naming_the_fix(layers):
    model, x = Blocks(depth=3), torch.randn(16, 32)
    handle = sigreg.attach(model, layers)
    model(x, reentrant=True)
    with pytest.raises(RuntimeError, match=r"blocks\.1.*use_reentrant=False"):
        handle.loss()
    model(x, reentrant=False)  # the error dropped that step; the fix works
    handle.loss()
    assert set(handle.layer_losses()) == set(sigreg.resolve_layers(model, layers))


def test_a_layer_also_run_under_no_grad_in_the_forward_is_fine():
    """Self-distillation: the same layer once with autograd, once without (targets)."""
    class Distil(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(8, 8)

        def forward(self, x):
            with torch.no_grad():
                target = self.encoder(x + 1)
            return self.encoder(x) - target

    model = Distil()
    handle = sigreg.attach(model, "encoder")
    model(torch.randn(16, 8))
    handle.loss()
    assert set(handle.layer_losses()) == {"encoder"}


def test_a_submodule_called_directly_is_recorded_and_its_recomputation_is_not():
    """A Lightning training_step that calls self.backbone(x), not self(x)."""
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Blocks()

    wrapper, direct, x = Wrapper(), Blocks(), torch.randn(16, 32)
    handle = sigreg.attach(wrapper, "backbone.blocks.*", sketch_policy="fixed")
    reference = sigreg.attach(direct, "blocks.*", sketch_policy="fixed")
    for _ in range(2):  # the recomputation must not become the second step's forward
        got = handle.combine(wrapper.backbone(x, reentrant=False).square().mean())
        expected = reference.combine(direct(x).square().mean())
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        assert len(handle.layer_losses()) == 4
        got.backward()  # recomputes blocks 1-3, outside any forward of `wrapper`
        expected.backward()


# ---- padding -------------------------------------------------------------------------------

class Tokens(nn.Module):
    """(B, T, C) -> (B, T, C): a per-token layer, so padding changes nothing but the count."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(6, 6)

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("pool", ["mean", "flatten"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_gives_the_statistics_of_its_real_tokens(pool, variant):
    torch.manual_seed(1)
    lengths = [5, 3, 7, 2, 6, 4]
    seqs = [torch.randn(n, 6) for n in lengths]
    padded = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=3.0)
    mask = torch.arange(padded.shape[1])[None] < torch.tensor(lengths)[:, None]
    model = Tokens()
    handle = sigreg.attach(model, "layer", variant, sketch_dim(variant), pool,
                           sketch_policy="fixed")
    handle.set_padding_mask(mask)
    model(padded)
    got = handle.loss()

    outputs = [model.layer(s) for s in seqs]
    real = torch.stack([o.mean(0) for o in outputs]) if pool == "mean" else torch.cat(outputs)
    part = handle._parts[0]
    stack = real[None]  # the fixed projection handle.loss() used, drawn for this layer
    expected = part.compute(stack, part.projections.for_group(0, (0,), stack))
    torch.testing.assert_close(got, expected.reshape(()), rtol=1e-5, atol=1e-6)


def test_the_mask_applies_to_one_forward_and_a_wrong_shape_is_named():
    model, x = Tokens(), torch.randn(4, 5, 6)
    handle = sigreg.attach(model, "layer", pool="flatten")
    handle.set_padding_mask(torch.ones(4, 5, dtype=torch.bool))
    model(x)
    handle.loss()
    model(x)  # no mask any more: every token counts
    handle.loss()
    handle.set_padding_mask(torch.ones(4, 3))
    model(x)
    with pytest.raises(ValueError, match=r"padding mask has shape \(4, 3\).*\(4, 5\)"):
        handle.loss()
    with pytest.raises(TypeError, match="padding mask must be a"):
        handle.set_padding_mask(torch.ones(4))


def test_a_pool_callable_with_a_mask_keyword_receives_it():
    seen = []

    def pool(output, mask=None):
        seen.append(mask)
        return output.mean(1)

    model, x = Tokens(), torch.randn(4, 5, 6)
    handle = sigreg.attach(model, "layer", pool=pool)
    mask = torch.ones(4, 5)
    handle.set_padding_mask(mask)
    model(x)
    handle.loss()
    assert seen[0] is mask


# ---- ragged batches --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_a_last_batch_of_one_trains_on_the_task_loss_with_one_warning(variant):
    model = mlp(depth=2)
    handle = sigreg.attach(model, "**.0", variant, sketch_dim(variant))
    data = torch.randn(17, 32)
    loader = torch.utils.data.DataLoader(data, batch_size=16, drop_last=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # two epochs: two batches of one, one warning
            for x in loader:
                task = model(x).square().mean()
                loss = handle.combine(task)
                if x.shape[0] == 1:
                    assert loss is task and handle.layer_losses() == {}
                opt.zero_grad()
                loss.backward()
                opt.step()
    too_few = [str(w.message) for w in caught if "too few" in str(w.message)]
    assert len(too_few) == 1 and "1 sample(s)" in too_few[0]


# ---- model copies ----------------------------------------------------------------------------

@pytest.mark.parametrize("copy_of", ["deepcopy", "AveragedModel"])
def test_a_copy_of_an_attached_model_is_not_regularized_and_leaves_the_handle_alone(copy_of):
    model, x = mlp(), torch.randn(16, 32)
    handle = sigreg.attach(model, "**.0", sketch_policy="fixed")
    twin = copy.deepcopy(model) if copy_of == "deepcopy" else \
        torch.optim.swa_utils.AveragedModel(model)
    model(x)
    expected = handle.loss().item()
    model(x)
    twin(x * 100)  # a training forward of the copy, with autograd: not the model's
    twin(x * 100)
    assert handle.loss().item() == pytest.approx(expected, rel=1e-6)  # no "2 forwards" error
    twin(x)
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        handle.loss()


# ---- the small ones ----------------------------------------------------------------------

def test_directions_of_width_one_are_never_nan(monkeypatch):
    """At width 1 a Gaussian draw of exact zero (once in ~1e7 float32 draws) made 0/0 = NaN
    directions; every direction of width 1 is now +1 (the statistic is the same for -1)."""
    monkeypatch.setattr(sigreg.sketch, "_gaussian", lambda batch, rows, cols, gen, device:
                        torch.zeros(*batch, rows, cols))
    d = sigreg.draw_directions(1, 4, batch=(3,))
    assert d.shape == (3, 1, 4) and torch.equal(d, torch.ones(3, 1, 4))
    z = torch.randn(16, 1)
    assert sigreg.strong_sigreg(z, d[0]) == pytest.approx(sigreg.strong_sigreg(-z, d[0]).item())


def test_a_sketch_as_wide_as_the_layer_says_it_is_the_full_covariance():
    model = nn.Sequential(nn.Linear(8, 32))
    handle = sigreg.attach(model, "0", sketch_dim=64)
    model(torch.randn(16, 8))
    with pytest.warns(UserWarning, match=re.escape("K=64 >= width 32")):
        handle.loss()


# ---- found by trying to break it (the same kinds as the cases above) -------------------------

def test_a_mask_is_used_up_by_the_forward_it_was_set_for():
    """Set for a batch, a mask never reaches a later unpadded one: an eval forward uses it up,
    loss() drops it when the step called a submodule."""
    model, x = Tokens(), torch.randn(4, 5, 6)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[:, 3:] = False
    reference = sigreg.attach(Tokens(), "layer", pool="flatten", sketch_policy="fixed")
    reference._capture.model(x)
    expected = reference.loss().item()
    handle = sigreg.attach(model, "layer", pool="flatten", sketch_policy="fixed")
    handle.set_padding_mask(mask)
    with torch.no_grad():
        model.eval()
        model(x)
    model.train()
    model(x)
    assert handle.loss().item() == pytest.approx(expected, rel=1e-6)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Tokens()

    wrapper = Wrapper()
    wrapped = sigreg.attach(wrapper, "inner.layer", pool="flatten", sketch_policy="fixed")
    wrapped.set_padding_mask(mask)
    wrapper.inner(x)
    wrapped.loss()
    wrapper.inner(x)  # the next batch, unpadded: no mask
    assert wrapped.loss().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("make, features", [
    (lambda: nn.Conv1d(3, 6, 3), lambda out: out.mean(2)),
    (lambda: nn.LSTM(3, 6), lambda out: out[0].mean(0)),
    (lambda: nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0), lambda out: out.mean(0)),
    (lambda: nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True),
     lambda out: out.mean(1)),
], ids=["conv1d", "lstm-sequence-first", "transformer-sequence-first", "transformer-batch-first"])
def test_mean_pooling_reads_torch_layers_in_their_own_layout(make, features):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(8, 3, 10) if isinstance(layer, nn.Conv1d) else \
        torch.randn(10, 8, 3 if isinstance(layer, nn.LSTM) else 6)
    model = nn.Sequential(layer)
    handle = sigreg.attach(model, "0", sketch_dim=None, keep_features=True)
    out = model(x)
    handle.loss()
    torch.testing.assert_close(handle.features()["0"], features(out).detach())


def test_an_output_read_in_the_wrong_layout_is_caught_when_its_width_changes():
    class ChannelsFirst(nn.Module):  # (B, C, L) from a custom module: not recognisable
        def forward(self, x):
            return x

    model = nn.Sequential(ChannelsFirst())
    handle = sigreg.attach(model, "0")
    model(torch.randn(8, 4, 10, requires_grad=True))
    handle.loss()
    model(torch.randn(8, 4, 12, requires_grad=True))
    with pytest.raises(ValueError, match=r"changed width from 10 to 12.*pool=a callable"):
        handle.loss()


def test_a_sequence_with_no_real_token_is_no_sample():
    model, x = Tokens(), torch.randn(5, 4, 6)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[4] = False
    handle = sigreg.attach(model, "layer", sketch_dim=None, keep_features=True)
    handle.set_padding_mask(mask)
    model(x)
    handle.loss()
    torch.testing.assert_close(handle.features()["layer"], model.layer(x[:4]).mean(1).detach())


def test_compiled_model_with_checkpointed_attached_layers_keeps_its_graphs():
    x = torch.randn(16, 32)
    counts, values = {}, {}
    for attached in (False, True):
        torch.compiler.reset()
        model, counter = Blocks(), CompileCounter()
        handle = sigreg.attach(model, "blocks.*", sketch_policy="fixed") if attached else None
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for _ in range(2):
            out = compiled(x, reentrant=False)
            loss = out.square().mean() + (handle.loss() if handle else 0)
            loss.backward()
        counts[attached] = counter.frame_count
        values[attached] = handle.layer_losses() if handle else None
    assert counts[True] == counts[False] == 1
    eager = sigreg.attach(Blocks(), "blocks.*", sketch_policy="fixed")
    eager._capture.model(x, reentrant=False)
    eager.loss()
    eager._capture.model(x, reentrant=False)
    eager.loss()
    assert values[True] == pytest.approx(eager.layer_losses(), rel=1e-5)


@pytest.mark.parametrize("pool", ["mean", "flatten"])
def test_compiled_model_with_padding_masks_of_varying_length_does_not_recompile(pool):
    frames = {}
    for masked in (False, True):
        torch.compiler.reset()
        model, counter = Tokens(), CompileCounter()
        handle = sigreg.attach(model, "layer", pool=pool)
        compiled = torch.compile(model, backend=counter)
        for length in range(3, 11):
            x = torch.randn(8, length, 6)
            if masked:
                handle.set_padding_mask(torch.arange(length)[None] < torch.tensor([length - 1] * 8)[:, None])
            handle.combine(compiled(x).square().mean()).backward()
        frames[masked] = counter.frame_count
    assert frames[True] == frames[False] <= 2


def test_no_regularized_layer_in_the_first_step_trains_on_the_task_loss():
    model, x = Blocks(), torch.randn(8, 32)
    handle = sigreg.attach(model, "blocks.*")
    task = model(x, skip=(0, 1, 2, 3)).square().mean()
    with pytest.warns(UserWarning, match="no regularized layer ran"):
        loss = handle.combine(task)
    assert loss is task
    model(x)
    handle.loss()
    assert len(handle.layer_losses()) == 4


def test_a_forward_that_raised_is_not_a_pass():
    class Flaky(Blocks):
        def forward(self, x, fail=False):
            x = torch.relu(self.blocks[0](x))
            if fail:
                raise torch.OutOfMemoryError("simulated")
            return super().forward(x)

    model, x = Flaky(), torch.randn(8, 32)
    handle = sigreg.attach(model, "blocks.*", sketch_policy="fixed")
    model(x)
    expected = handle.loss().item()
    with pytest.raises(torch.OutOfMemoryError):
        model(x, fail=True)
    model(x)  # the next batch: one forward, not two
    assert handle.loss().item() == pytest.approx(expected, rel=1e-6)


def test_an_attached_model_saves_and_loads_without_its_hooks(tmp_path):
    model, x = Blocks(), torch.randn(8, 32)
    handle = sigreg.attach(model, "blocks.*")
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), model(x))  # the model's forward: one pass
    handle.loss()  # the loaded copy's forward did not count


def test_errors_name_their_cause():
    model, x = Blocks(), torch.randn(8, 32, requires_grad=True)
    handle = sigreg.attach(model, "blocks.*")
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(handle)
    checkpoint(model, x, use_reentrant=True)  # the whole model under no_grad
    with pytest.raises(RuntimeError, match="under torch.no_grad.*use_reentrant=False"):
        handle.loss()
    handle.remove()
    model(x)
    with pytest.raises(RuntimeError, match=r"removed \(handle.remove\(\)\)"):
        handle.loss()


def test_an_unattached_instance_compiled_first_does_not_hide_the_hooks():
    """The baseline arm of a comparison compiled and run before the first attach (a fresh
    process: dynamo's default of not guarding on hooks): the attached instance of the same
    class still runs its hooks when compiled."""
    import torch._dynamo

    # torch's own patch (pytest's monkeypatch breaks dynamo's config module on undo)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        torch.compiler.reset()
        x = torch.randn(8, 32)
        baseline = torch.compile(Blocks(), backend="eager")
        baseline(x)
        model = Blocks()
        handle = sigreg.attach(model, "blocks.*")
        torch.compile(model, backend="eager")(x)
        handle.loss()
        assert len(handle.layer_losses()) == 4
        baseline(x)  # recompiled, still right
