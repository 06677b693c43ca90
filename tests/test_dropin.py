"""`attach` where people really train (issue 17): compiled models, activation checkpointing,
padded batches, ragged last batches, model copies. Layers that run on some ranks only are
in tests/test_distributed.py."""

import copy
import dataclasses
import pickle
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
    """The hooks are traced into the model's graph: as many graphs as without attach and
    the same ops plus a copy (clone, view) of each output kept as it is (these (N, C)
    outputs; inductor drops the copy where nothing changes the output in place),
    fullgraph=True works, and the steps after the first reuse the graph."""
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
    layers = 6 if make is mlp else 4
    assert counts[True] == (counts[False][0], counts[False][1] + 2 * layers)
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
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.copy(handle)  # it used to share the hooks
    with pytest.raises(TypeError, match="cannot be copied or pickled.*state_dict"):
        pickle.dumps(handle)
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


# ---- in-place ops after a regularized layer ---------------------------------------------------

class InPlaceAfter(nn.Module):
    """A regularized Linear whose output an in-place ReLU overwrites (a projector's
    BatchNorm1d -> ReLU(inplace=True) does the same)."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head, self.inplace = nn.Linear(8, 8), nn.Linear(8, 2), inplace

    def forward(self, x):
        h = self.lin(x)
        return self.head(torch.relu_(h) if self.inplace else torch.relu(h))


def in_place_case(case):
    """(attach keywords, input, padding mask or None) of each kind of kept output."""
    tokens = torch.randn(4, 6, 8)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 3:] = False
    return {"2-d": ({}, torch.randn(16, 8), None),
            "flatten": ({"pool": "flatten"}, tokens, None),
            "cls": ({"pool": "cls"}, tokens, None),
            "masked-mean": ({}, tokens, mask),
            "callable-view": ({"pool": lambda out: out[:, 0]}, tokens, None)}[case]


IN_PLACE_CASES = ("2-d", "flatten", "cls", "masked-mean", "callable-view")


@pytest.mark.parametrize("case", IN_PLACE_CASES)
def test_an_output_changed_in_place_after_its_layer_is_refused_naming_the_layer(case):
    """Eager mode: the kept output's version counter moved, so loss() raises (it used to
    regularize relu(output) silently); the out-of-place model is regularized."""
    kwargs, x, mask = in_place_case(case)
    for inplace in (True, False):
        model = InPlaceAfter(inplace)
        handle = sigreg.attach(model, "lin", sketch_dim=None, **kwargs)
        handle.set_padding_mask(mask)
        model(x)
        if inplace:
            with pytest.raises(RuntimeError, match=r"layer 'lin''s output was modified in "
                                                   r"place.*inplace=False"):
                handle.loss()
            handle.set_padding_mask(mask)
            model(x)  # the error dropped the step: the next one raises again, not "2 passes"
            with pytest.raises(RuntimeError, match="modified in place"):
                handle.loss()
        else:
            handle.loss()
            assert set(handle.layer_losses()) == {"lin"}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", ["2-d", "flatten", "masked-mean"])
def test_a_compiled_model_regularizes_the_output_before_an_in_place_op(case, backend):
    """A compiled graph has no version counters to check: the hook keeps a copy there, so the
    value is the layer's own output's, and a user's own `detach().clone()` hook on the same
    layer does not break inductor's backward."""
    kwargs, x, mask = in_place_case(case)
    torch.compiler.reset()
    model, reference = InPlaceAfter(True), InPlaceAfter(False)
    handle = sigreg.attach(model, "lin", sketch_dim=None, keep_features=True, **kwargs)
    expected = sigreg.attach(reference, "lin", sketch_dim=None, keep_features=True, **kwargs)
    seen = []
    model.lin.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    for h in (handle, expected):
        h.set_padding_mask(mask)
    out = torch.compile(model, backend=backend)(x)
    loss = handle.loss()
    (out.sum() + loss).backward()
    reference(x)
    torch.testing.assert_close(loss, expected.loss(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(handle.features()["lin"], expected.features()["lin"])


# ---- layer outputs: tuples, dicts, dataclasses, packed sequences -------------------------------

@dataclasses.dataclass
class Hidden:
    mask: torch.Tensor
    hidden: torch.Tensor


class Returns(nn.Module):
    """A Linear whose output is wrapped as ``kind`` says, the hidden states (B, T, 8) among
    integer or bool tensors."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.kind = nn.Linear(8, 8), kind

    def forward(self, x):
        h = self.lin(x)
        codes = h.argmax(-1)
        return {"codes-first": lambda: (codes, h), "dict": lambda: {"codes": codes, "hidden": h},
                "dataclass": lambda: Hidden(codes > 0, h), "list": lambda: [None, h],
                "integer": lambda: codes, "bool": lambda: codes > 0,
                "no-float": lambda: (codes, codes > 0), "string": lambda: "hidden"}[self.kind]()


@pytest.mark.parametrize("kind", ["codes-first", "dict", "dataclass", "list", "model-output"])
def test_the_first_floating_point_tensor_of_an_output_is_its_features(kind):
    """(codes, quantized) used to regularize the integer codes (no gradient, no warning)."""
    x = torch.randn(16, 5, 8)
    model = nn.Sequential(Returns("dict" if kind == "model-output" else kind))
    if kind == "model-output":
        outputs = pytest.importorskip("transformers.modeling_outputs")
        inner = model[0]
        model = nn.Sequential(type("HF", (nn.Module,), {
            "__init__": lambda self: (nn.Module.__init__(self), setattr(self, "inner", inner))[0],
            "forward": lambda self, x: outputs.BaseModelOutput(
                last_hidden_state=self.inner(x)["hidden"])})())
    handle = sigreg.attach(model, "0", sketch_dim=None, keep_features=True)
    model(x)
    loss = handle.loss()
    assert loss.requires_grad
    lin = next(m for m in model.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(handle.features()["0"], lin(x).mean(1).detach())


@pytest.mark.parametrize("kind, message", [
    ("integer", r"layer '0''s output is a torch.int64 tensor.*pool=\) a callable"),
    ("bool", r"layer '0''s output is a torch.bool tensor.*pool=\) a callable"),
    ("no-float", r"layer '0' returned a tuple with no floating-point tensor.*pool=\) a callable"),
    ("string", r"layer '0' returned a str.*pool=\) a callable"),
])
def test_outputs_a_named_pool_cannot_read_are_refused_naming_layer_type_and_pool(kind, message):
    model = nn.Sequential(Returns(kind))
    sigreg.attach(model, "0")
    with pytest.raises(TypeError, match=message):
        model(torch.randn(4, 5, 8))
    handle = sigreg.attach(nn.Sequential(Returns(kind)), "0",
                           pool=lambda out: torch.randn(4, 3, requires_grad=True))
    handle._capture.model(torch.randn(4, 5, 8))  # a callable reads anything
    handle.loss()


def test_an_unreadable_shape_names_the_layer_and_pool_callable():
    model = nn.Sequential(nn.Conv3d(3, 4, 3))
    handle = sigreg.attach(model, "0", keep_features=True)
    x = torch.randn(4, 3, 5, 5, 5)
    out = model(x)  # 5-D (B, C, D, H, W): "mean" averages D, H and W
    handle.loss()
    torch.testing.assert_close(handle.features()["0"], out.mean((2, 3, 4)).detach())
    with pytest.raises(ValueError, match=r"pool='flatten' cannot turn layer '0''s output of "
                                         r"shape \(4, 4, 3, 3, 3\).*pool=\) a callable"):
        flat = nn.Sequential(nn.Conv3d(3, 4, 3))
        sigreg.attach(flat, "0", pool="flatten")
        flat(x)


@pytest.mark.parametrize("pool", ["mean", "flatten", "cls"])
def test_a_packed_sequence_is_pooled_from_its_real_time_steps(pool):
    torch.manual_seed(0)
    rnn = nn.LSTM(4, 6, batch_first=True)
    model = nn.Sequential()
    model.rnn = rnn
    lengths = torch.tensor([5, 3, 2, 5, 1, 4])
    x = torch.randn(6, 5, 4)
    handle = sigreg.attach(model, "rnn", pool=pool, sketch_dim=None, keep_features=True)
    model.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                enforce_sorted=False))
    handle.loss()
    steps = [rnn(x[i:i + 1, :n])[0][0].detach() for i, n in enumerate(lengths.tolist())]
    expected = {"mean": torch.stack([s.mean(0) for s in steps]), "flatten": torch.cat(steps),
                "cls": torch.stack([s[0] for s in steps])}[pool]
    got = handle.features()["rnn"]
    # the same samples, in the packed order: compare sorted rows
    def by_first_feature(t):
        return t[torch.argsort(t[:, 0])]

    torch.testing.assert_close(by_first_feature(got), by_first_feature(expected), rtol=1e-5,
                               atol=1e-6)


# ---- steps that call submodules; checkpointing and eval-mode submodules -----------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_steps_that_call_a_submodule_are_delimited_like_forwards_of_the_model():
    """model.backbone(x) steps used to merge into one pass: 200 steps without loss() held
    200 calls (and their graphs), and the first loss() regularized stale steps."""
    model = Net()
    handle = sigreg.attach(model, "backbone.2", sketch_dim=None, keep_features=True)
    for _ in range(200):  # a baseline arm: loss() never called
        model.head(model.backbone(torch.randn(32, 8))).sum().backward()
    assert sum(len(p) for p in handle._capture.passes) == 1
    handle.clear()
    model.backbone(torch.randn(32, 8))
    model.backbone(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match="2 training forward passes"):
        handle.loss()
    x = torch.randn(32, 8)
    model.backbone(x)
    handle.loss()
    torch.testing.assert_close(handle.features()["backbone.2"], model.backbone(x).detach())
    handle.clear()

    views = sigreg.attach(model, "backbone.2", sketch_dim=None, accumulate=2)
    reference = sigreg.attach(Net(), "backbone.2", sketch_dim=None, accumulate=2)
    x1, x2 = torch.randn(32, 8), torch.randn(32, 8)
    handle.remove()
    model.backbone(x1)
    model.backbone(x2)
    reference._capture.model(x1)
    reference._capture.model(x2)
    assert views.loss().item() == pytest.approx(reference.loss().item(), rel=1e-6)


def test_a_step_that_calls_several_submodules_is_one_pass():
    """An autoencoder's step z = model.encoder(x); model.decoder(z): one pass; the next
    step's encoder call opens the next."""
    class AutoEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.encoder, self.decoder = nn.Linear(8, 4), nn.Linear(4, 8)

        def forward(self, x):
            return self.decoder(self.encoder(x))

    model, x = AutoEncoder(), torch.randn(16, 8)
    handle = sigreg.attach(model, ["encoder", "decoder"], sketch_dim=None)
    reference = sigreg.attach(AutoEncoder(), ["encoder", "decoder"], sketch_dim=None)
    for _ in range(2):
        model.decoder(model.encoder(x))
        reference._capture.model(x)
        assert handle.loss().item() == pytest.approx(reference.loss().item(), rel=1e-6)
        assert set(handle.layer_losses()) == {"encoder", "decoder"}
    model.decoder(model.encoder(x))
    model.decoder(model.encoder(x))
    with pytest.raises(RuntimeError, match="2 training forward passes"):
        handle.loss()


def test_a_submodule_step_that_raised_is_not_a_pass():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, fail=False):
            x = self.lin(x)
            if fail:
                raise torch.OutOfMemoryError("simulated")
            return x

    model = nn.Sequential()
    model.block = Flaky()
    handle = sigreg.attach(model, "block.lin")
    with pytest.raises(torch.OutOfMemoryError):
        model.block(torch.randn(8, 8), fail=True)
    model.block(torch.randn(8, 8))
    handle.loss()  # one pass, not two


@pytest.mark.parametrize("how", ["checkpoint_sequential", "checkpoint-of-a-submodule"])
def test_reentrant_checkpointing_outside_the_forward_is_refused_naming_the_fix(how):
    """checkpoint_sequential calls the model's children, not the model: its checkpointed
    segments ran under no_grad with no pass open and were dropped without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
    handle = sigreg.attach(model, nn.Linear, sketch_dim=None)
    x = torch.randn(32, 8, requires_grad=True)
    if how == "checkpoint_sequential":
        out = torch.utils.checkpoint.checkpoint_sequential(model, 2, x, use_reentrant=True)
    else:
        out = model[4](checkpoint(model[:4], x, use_reentrant=True))
    with pytest.raises(RuntimeError, match=r"\['0', '2'\].*no_grad.*use_reentrant=False"
                       if how != "checkpoint_sequential" else
                       r"\['0'\].*no_grad.*use_reentrant=False"):
        handle.combine(out.square().mean())
    out.square().mean().backward()  # the recomputation in backward records nothing
    torch.utils.checkpoint.checkpoint_sequential(model, 2, x, use_reentrant=False)
    handle.loss()
    assert set(handle.layer_losses()) == {"0", "2", "4"}


def test_layers_of_an_eval_mode_submodule_of_a_training_model_are_regularized():
    """Frozen BatchNorm statistics (model.train(); backbone.eval()) still train the weights:
    training is the attached model's mode, not each layer's."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU())
                            for _ in range(3)])
    handle = sigreg.attach(model, "*", sketch_dim=None)
    x = torch.randn(32, 8)
    model.train()
    model[0].eval()
    model(x)
    handle.loss()
    assert len(handle.layer_losses()) == 3
    for block in model:
        block.eval()
    model(x)
    handle.loss()
    assert len(handle.layer_losses()) == 3
    model.eval()  # the model in eval mode: not a training forward
    model(x)
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        handle.loss()


def test_regularizing_only_layers_no_gradient_reaches_warns_once():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    handle = sigreg.attach(model, "0", sketch_dim=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(torch.randn(16, 8))
            handle.loss()
    messages = [str(w.message) for w in caught if "no gradient reaches" in str(w.message)]
    assert len(messages) == 1 and "['0']" in messages[0]
    model[0].requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle2 = sigreg.attach(nn.Sequential(nn.Linear(8, 8)), "0", sketch_dim=None)
        handle2._capture.model(torch.randn(16, 8))
        handle2.loss()


def test_torch_export_of_a_training_model_records_nothing():
    """export traces the model in training mode with fake tensors: it left a pass, and the
    next loss() raised '2 training forward passes'."""
    model, x = mlp(depth=2), torch.randn(16, 32)
    handle = sigreg.attach(model, "**.0", sketch_dim=None)
    handle.combine(model(x).square().mean()).backward()
    exported = torch.export.export(model, (x,))
    assert handle._capture.passes == []
    model(x)
    handle.loss()
    exported.module()(x)
    assert handle._capture.passes == []


def test_data_parallel_replicas_are_refused_naming_ddp():
    """nn.DataParallel runs replicas of the model (copies, marked _is_replica) on its GPUs:
    the hooks skip them, and loss() pointed at torch.compiler.reset()."""
    model = mlp(depth=2)
    handle = sigreg.attach(model, "**.0")
    replica = copy.deepcopy(model)  # what torch.nn.parallel.replicate makes, on one device
    replica._is_replica = True
    replica(torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="DataParallel.*DistributedDataParallel"):
        handle.loss()


def test_forwards_of_one_sample_are_pooled_by_accumulate_and_otherwise_named():
    """A per-device batch of one (LLM fine-tuning with gradient accumulation) was never
    regularized, after one warning blaming 'a last batch of one?' (and listing a layer once
    per forward); accumulate=k forwards of one sample each now pool their k samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    handle = sigreg.attach(model, "0", sketch_dim=None, accumulate=4, keep_features=True)
    xs = [torch.randn(1, 12, 8) for _ in range(4)]
    task = sum(model(x).square().mean() for x in xs)
    loss = handle.combine(task)
    expected = sigreg.weak_sigreg(torch.cat([model[0](x).mean(1) for x in xs]))
    assert handle.layer_losses()["0"] == pytest.approx(expected.item(), rel=1e-5)
    assert handle.features()["0"].shape == (4, 8)
    loss.backward()
    assert model[0].weight.grad is not None

    handle.remove()
    single = sigreg.attach(model, "0", sketch_dim=None, accumulate=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            single.combine(model(torch.randn(1, 8)).square().mean())
    too_few = [str(w.message) for w in caught if "too few" in str(w.message)]
    assert len(too_few) == 1
    assert "['0'] have 1 sample(s)" in too_few[0] and "per-device batch of one" in too_few[0]
    assert "accumulate=k" in too_few[0]


# ---- padding masks per layer group (encoder-decoder) ------------------------------------------

class EncoderDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleList([nn.Linear(8, 8)])
        self.dec = nn.ModuleList([nn.Linear(8, 8)])

    def forward(self, src, tgt):
        m = torch.tanh(self.enc[0](src))
        return torch.tanh(self.dec[0](tgt + m.mean(1, keepdim=True)))


def test_a_padding_mask_per_layer_group():
    """set_padding_mask(mask) applied the encoder's mask to the decoder's layers too (silently
    when source and target had the same length)."""
    model = EncoderDecoder()
    handle = sigreg.attach(model, ["enc.*", "dec.*"], sketch_dim=None, keep_features=True)
    src, tgt = torch.randn(6, 5, 8), torch.randn(6, 5, 8)
    src_mask = torch.ones(6, 5, dtype=torch.bool)
    src_mask[1:, 2:] = False
    tgt_mask = torch.ones(6, 5, dtype=torch.bool)
    tgt_mask[:3, 4:] = False
    seen = {}
    model.dec[0].register_forward_hook(lambda m, i, out: seen.__setitem__("dec", out.detach()))
    model.enc[0].register_forward_hook(lambda m, i, out: seen.__setitem__("enc", out.detach()))

    def masked_mean(out, mask):
        return torch.stack([o[k].mean(0) for o, k in zip(out, mask, strict=True)])

    for masks, dec_mask in [({"enc.*": src_mask}, None),
                            ({"enc.*": src_mask, "dec.*": tgt_mask}, tgt_mask),
                            ({"enc.*": src_mask, "**": None}, None)]:
        handle.set_padding_mask(masks)
        model(src, tgt)
        handle.loss()
        features = handle.features()
        torch.testing.assert_close(features["enc.0"], masked_mean(seen["enc"], src_mask))
        expected = seen["dec"].mean(1) if dec_mask is None else masked_mean(seen["dec"], dec_mask)
        torch.testing.assert_close(features["dec.0"], expected)
    with pytest.raises(ValueError, match=r"keys \['decoder\.\*'\] match none"):
        handle.set_padding_mask({"enc.*": src_mask, "decoder.*": tgt_mask})
    with pytest.raises(TypeError, match="padding mask must be a"):
        handle.set_padding_mask({"enc.*": torch.ones(3)})
