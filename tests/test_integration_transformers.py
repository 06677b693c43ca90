"""sigreg.integrations.transformers: Hugging Face Trainer steps against a hand-written loop.

Models are built from small configs (no download): a ViT classifier (``pool="cls"``) and a
GPT-2 language model (``pool="flatten"``, with gradient accumulation). Then the mixin over
other compute_loss signatures, the Trainer without ``sigreg=``, ``sigreg=`` checked at
construction, the task-loss log entry, and activation checkpointing.
"""

import copy
import inspect
import re

import pytest
import torch

import sigreg

transformers = pytest.importorskip(
    "transformers", reason="needs the [transformers] extra: pip install -e '.[transformers]'")
pytest.importorskip("accelerate", reason="needs the [transformers] extra (accelerate)")
from transformers import TrainerCallback, TrainingArguments

from sigreg.integrations.transformers import SIGRegMixin, SIGRegTrainer

ALPHA = 0.5


class GradCapture(TrainerCallback):
    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.clone() for p in model.parameters()])


class RecordingTrainer(SIGRegTrainer):
    """Keeps each training micro-batch, to replay it in the reference loop."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, *args, **kwargs)


def vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=10)
    return transformers.ViTForImageClassification(config)


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
        eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def train(model, dataset, sigreg_settings, tmp_path, batch_size, accumulation=1):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-3,
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0)
    capture = GradCapture()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset,
                               callbacks=[capture], sigreg=sigreg_settings)
    trainer.seen = []
    trainer.train()
    return trainer, capture.grads[0]


def reference(model, micro_batches, sigreg_settings, regularized=True):
    """Gradients of mean_h [(1 - a) task_h + a reg_h] over the micro-batches, plain loop."""
    handle = sigreg.attach(model, **sigreg_settings) if regularized else None
    per_layer: dict[str, float] = {}
    for inputs in micro_batches:
        loss = model(**inputs).loss
        if handle is not None:
            loss = handle.combine(loss)
            for name, value in handle.layer_losses().items():
                per_layer[name] = per_layer.get(name, 0.0) + value / len(micro_batches)
        (loss / len(micro_batches)).backward()
    return [p.grad.clone() for p in model.parameters()], per_layer


def check(trainer, grads, ref, plain, per_layer, layers):
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads, ref, strict=True))
    assert not all(torch.allclose(g, p, atol=1e-4) for g, p in zip(grads, plain, strict=True))
    logs = next(row for row in trainer.state.log_history if "loss" in row)
    assert set(per_layer) == set(layers)
    for name in layers:
        assert logs[f"sigreg/loss/{name}"] == pytest.approx(per_layer[name], rel=1e-5)
        assert logs[f"sigreg/eff_dim/{name}"] >= 1.0
    # train() removed its hooks: the model is as before.
    assert all(not m._forward_hooks for m in trainer.model.modules())


def test_vision_model_cls_pool(tmp_path):
    g = torch.Generator().manual_seed(1)
    dataset = [{"pixel_values": torch.randn(1, 28, 28, generator=g), "labels": i % 10}
               for i in range(16)]
    settings = dict(layers="vit.layers.*", pool="cls", sketch_dim=8, alpha=ALPHA)
    model = vit()
    initial = copy.deepcopy(model)
    trainer, grads = train(model, dataset, settings, tmp_path, batch_size=16)
    ref, per_layer = reference(copy.deepcopy(initial), trainer.seen, settings)
    plain, _ = reference(copy.deepcopy(initial), trainer.seen, settings, regularized=False)
    check(trainer, grads, ref, plain, per_layer, ["vit.layers.0", "vit.layers.1"])
    # Evaluation neither needs nor computes the regularizer.
    assert "eval_loss" in trainer.evaluate(dataset[:8])


def test_language_model_flatten_pool_with_gradient_accumulation(tmp_path):
    """GPT-2 takes num_items_in_batch, so the Trainer leaves the loss undivided by the
    accumulation steps: the regularizer keeps its weight only if the mixin divides it."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (8, 16), generator=g)
    # The Trainer counts num_items_in_batch before the causal shift: masking the first label
    # (never a target) makes its count the loss's, so its loss is the mean over micro-batches.
    labels = ids.clone()
    labels[:, 0] = -100
    dataset = [{"input_ids": i, "labels": t} for i, t in zip(ids, labels, strict=True)]
    settings = dict(layers="transformer.h.*", pool="flatten", sketch_dim=8, alpha=ALPHA)
    model = gpt2()
    initial = copy.deepcopy(model)
    trainer, grads = train(model, dataset, settings, tmp_path, batch_size=4, accumulation=2)
    assert trainer.model_accepts_loss_kwargs and len(trainer.seen) == 2
    ref, per_layer = reference(copy.deepcopy(initial), trainer.seen, settings)
    plain, _ = reference(copy.deepcopy(initial), trainer.seen, settings, regularized=False)
    check(trainer, grads, ref, plain, per_layer, ["transformer.h.0", "transformer.h.1"])


class StopAt(TrainerCallback):
    """Ends training after ``step`` optimizer steps, as an interrupted job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def lm_run(out, callbacks=(), resume=None, alpha=None):
    """4 steps of GPT-2 with a resampled weak sketch (K 8 < width 32), checkpoint every 2."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (16, 16), generator=g)
    dataset = [{"input_ids": i, "labels": i} for i in ids]
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, logging_steps=100)
    settings = dict(layers="transformer.h.*", pool="flatten", sketch_dim=8,
                    alpha=ALPHA if alpha is None else alpha)
    trainer = SIGRegTrainer(model=gpt2(), args=args, train_dataset=dataset,
                            callbacks=list(callbacks), sigreg=settings)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_from_a_checkpoint_continues_the_sketch_stream(tmp_path):
    whole = lm_run(tmp_path / "whole")
    lm_run(tmp_path / "cut", callbacks=[StopAt(2)])
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert torch.load(checkpoint / "sigreg_state.pt", weights_only=True)["step"] == 2

    resumed = lm_run(tmp_path / "cut", resume=True)  # the last checkpoint: checkpoint-2

    want = whole.model.state_dict()
    got = resumed.model.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    assert resumed.sigreg.state_dict()["step"] == 4

    # A checkpoint saved without SIGReg resumes with a warning: the stream starts over.
    (checkpoint / "sigreg_state.pt").unlink()
    with pytest.warns(UserWarning, match="has no sigreg_state.pt"):
        lm_run(tmp_path / "cut", resume=str(checkpoint))


def test_alpha_auto_resumes_exactly_and_is_logged(tmp_path):
    # alpha="auto": sigreg_state.pt carries the weight's state (settled on every process at
    # each step's end), so the cut and resumed run ends where the uncut one does.
    whole = lm_run(tmp_path / "whole", alpha="auto")
    lm_run(tmp_path / "cut", callbacks=[StopAt(2)], alpha="auto")
    saved = torch.load(tmp_path / "cut" / "checkpoint-2" / "sigreg_state.pt", weights_only=True)
    assert saved["auto"]["updates"] == 2 and saved["auto"]["watched"] is False
    resumed = lm_run(tmp_path / "cut", resume=True, alpha="auto")
    want, got = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    assert float(resumed.sigreg.state_dict()["auto"]["weight"]) == \
        float(whole.sigreg.state_dict()["auto"]["weight"])
    logs = train_logs(SIGRegTrainer, tmp_path / "log", sigreg={**LM_SETTINGS, "alpha": "auto"})
    assert logs[0]["sigreg/alpha"] == pytest.approx(0.1)  # the first step's weight: the base


def lm_data(rows=8):
    g = torch.Generator().manual_seed(4)
    return [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (rows, 16), generator=g)]


def lm_args(out, **overrides):
    """One step of batch 4, logged every step, nothing saved."""
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=1,
                    learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return TrainingArguments(**{**settings, **overrides})


def train_logs(trainer_class, tmp_path, **kwargs):
    """The training log rows (those with "loss") of a GPT-2 run of ``trainer_class``."""
    trainer = trainer_class(model=gpt2(), args=kwargs.pop("args", lm_args(tmp_path)),
                            train_dataset=lm_data(), **kwargs)
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row]


class NoReturnOutputs(transformers.Trainer):
    """A compute_loss that takes no ``return_outputs``."""

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        return model(**inputs).loss


class AlwaysBareLoss(transformers.Trainer):
    """A compute_loss that ignores ``return_outputs`` and returns the loss alone."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(**inputs).loss


@pytest.mark.parametrize("base", [NoReturnOutputs, AlwaysBareLoss])
def test_mixin_over_a_compute_loss_without_outputs(base, tmp_path):
    mixed = type(f"SIGReg{base.__name__}", (SIGRegMixin, base), {})
    settings = dict(layers="transformer.h.*", pool="flatten", sketch_dim=8, alpha=ALPHA)
    regularized = train_logs(mixed, tmp_path / "sigreg", sigreg=settings)
    plain = train_logs(base, tmp_path / "plain")
    assert "sigreg/loss" in regularized[0] and "sigreg/loss" not in plain[0]
    assert regularized[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-3)


class NoHooks(TrainerCallback):
    """Asserts, at every step, that no module of the model carries a forward hook."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_without_sigreg_the_trainer_is_the_plain_one(tmp_path):
    args = dict(max_steps=2)
    ours = train_logs(SIGRegTrainer, tmp_path / "ours", args=lm_args(tmp_path / "ours", **args),
                      callbacks=[NoHooks()])
    plain = train_logs(transformers.Trainer, tmp_path / "plain",
                       args=lm_args(tmp_path / "plain", **args))
    assert [set(row) for row in ours] == [set(row) for row in plain]
    assert [row["loss"] for row in ours] == [row["loss"] for row in plain]


LM_SETTINGS = dict(layers="transformer.h.*", pool="flatten", sketch_dim=8, alpha=ALPHA)


def test_unknown_sigreg_keys_are_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(TypeError, match=r"\['alpah', 'pooling'\]") as error:
        SIGRegTrainer(model=gpt2(), args=lm_args(tmp_path),
                      sigreg={**LM_SETTINGS, "alpah": 0.1, "pooling": "cls"})
    named = set(str(error.value).split("valid keys: ")[1].split(", "))
    takes = set(inspect.signature(sigreg.attach).parameters) - {"model", "variant_kwargs"}
    variant_options = {"t_max", "num_points", "gamma", "var_weight", "cov_weight", "eps",
                       "scale_invariant"}
    assert named == takes | variant_options | {"log_prefix", "log_eff_dim"}


@pytest.mark.parametrize("bad", [
    dict(pool="avg"), dict(variant="weird"), dict(layers="decoder.*"), dict(alpha=1.5),
    dict(t_max=2.0),  # an option of the strong variant, given to the weak one
])
def test_bad_sigreg_values_are_refused_when_the_trainer_is_built(bad, tmp_path):
    settings = {**LM_SETTINGS, **bad}
    with pytest.raises((TypeError, ValueError)) as direct:
        sigreg.attach(gpt2(), **settings)
    model = gpt2()
    with pytest.raises(type(direct.value), match=re.escape(str(direct.value))):
        SIGRegTrainer(model=model, args=lm_args(tmp_path), sigreg=settings)
    assert all(not m._forward_hooks for m in model.modules())


def test_a_valid_sigreg_leaves_no_hooks_until_training(tmp_path):
    model = gpt2()
    SIGRegTrainer(model=model, args=lm_args(tmp_path), sigreg=LM_SETTINGS)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(TypeError, match="layers"):
        SIGRegTrainer(model=model, args=lm_args(tmp_path), sigreg=dict(pool="flatten"))


@pytest.mark.parametrize("loss_kwargs", [True, False])
def test_task_loss_is_logged_beside_the_regularizer(loss_kwargs, tmp_path):
    """Two logs of two steps of 2 micro-batches. With ``num_items_in_batch`` (GPT-2's
    default) the Trainer sums the micro-batch losses, else it averages them:
    ``sigreg/task_loss`` follows, on the scale of a plain run's ``loss``."""
    args = lm_args(tmp_path, max_steps=2, gradient_accumulation_steps=2,
                   per_device_train_batch_size=2)
    rows = {}
    for name, trainer_class, extra in [("sigreg", SIGRegTrainer, dict(sigreg=LM_SETTINGS)),
                                       ("plain", transformers.Trainer, {})]:
        trainer = trainer_class(model=gpt2(), args=args, train_dataset=lm_data(), **extra)
        trainer.model_accepts_loss_kwargs = loss_kwargs
        trainer.train()
        rows[name] = [row for row in trainer.state.log_history if "loss" in row]
    for row in rows["sigreg"]:
        combined = (1 - ALPHA) * row["sigreg/task_loss"] + ALPHA * row["sigreg/loss"]
        assert row["loss"] == pytest.approx(combined, rel=1e-5)
    # The first step starts from the same weights: the same task loss.
    assert rows["sigreg"][0]["sigreg/task_loss"] == pytest.approx(rows["plain"][0]["loss"], rel=1e-5)


@pytest.mark.parametrize("kwargs", [None, {"preserve_rng_state": True}])
def test_gradient_checkpointing_leaves_every_block_regularized(kwargs, tmp_path):
    """Checkpointing without a word on ``use_reentrant`` gets the non-reentrant variant,
    whose forward the hooks see: the run logs what the run without checkpointing does."""
    rows = {}
    for checkpointing in (False, True):
        extra = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
        args = lm_args(tmp_path / str(checkpointing), **(extra if checkpointing else {}))
        trainer = SIGRegTrainer(model=gpt2(), args=args, train_dataset=lm_data(),
                                sigreg=LM_SETTINGS)
        trainer.train()
        rows[checkpointing] = next(r for r in trainer.state.log_history if "loss" in r)
    assert trainer.model.is_gradient_checkpointing
    assert trainer.args.gradient_checkpointing_kwargs == {**(kwargs or {}), "use_reentrant": False}
    for key in ("loss", "sigreg/loss/transformer.h.0", "sigreg/loss/transformer.h.1"):
        assert rows[True][key] == pytest.approx(rows[False][key], rel=1e-5)


def test_an_explicit_use_reentrant_is_kept(tmp_path):
    args = lm_args(tmp_path, gradient_checkpointing=True,
                   gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = SIGRegTrainer(model=gpt2(), args=args, sigreg=LM_SETTINGS)
    assert trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": True}


def padded_text(length: int) -> list[dict[str, torch.Tensor]]:
    """Four sequences of 3-8 tokens, right-padded to ``length`` (labels -100 at pads)."""
    g = torch.Generator().manual_seed(3)
    items = []
    for n in (3, 8, 5, 6):
        ids = torch.randint(1, 64, (n,), generator=g)
        pad = length - n
        items.append({"input_ids": torch.cat([ids, torch.zeros(pad, dtype=torch.long)]),
                      "attention_mask": torch.cat([torch.ones(n), torch.zeros(pad)]).long(),
                      "labels": torch.cat([ids, torch.full((pad,), -100)])})
    return items


@pytest.mark.parametrize("pool", ["flatten", "mean"])
def test_padding_does_not_change_the_regularizer(pool, tmp_path):
    """The batch's attention_mask reaches the pooling: the same tokens padded to 8 or to 12
    give the same sigreg/loss (causal GPT-2: real tokens do not see the right padding)."""
    settings = dict(layers="transformer.h.*", pool=pool, alpha=ALPHA, sketch_policy="fixed")
    logged = []
    for length in (8, 12):
        trainer, _ = train(gpt2(), padded_text(length), settings, tmp_path / str(length), 4)
        logged.append(trainer.state.log_history[0]["sigreg/loss"])
    # A tiny GPT-2's hidden states are small, so the loss is near its constant part and the
    # pads move it by ~1e-4 relative (1.1e-4 flatten, 1e-5 mean): compare tightly.
    assert logged[1] == pytest.approx(logged[0], rel=1e-6)


@pytest.mark.parametrize("damage", ["unreadable", "loadable"])
def test_a_damaged_sigreg_state_file_is_named_before_training(damage, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"  # only the file that matters: read before training
    checkpoint.mkdir()
    if damage == "unreadable":
        (checkpoint / "sigreg_state.pt").write_bytes(b"\x80\x02 cut short")
        message = "cannot be read"
    else:
        torch.save({"step": -3, "fixed": {}}, checkpoint / "sigreg_state.pt")
        message = "does not fit these settings .state\\['step'\\] must be an integer >= 0"
    trainer = SIGRegTrainer(model=gpt2(), args=lm_args(tmp_path), train_dataset=lm_data(),
                            sigreg=dict(layers="transformer.h.*", pool="flatten", sketch_dim=8))
    with pytest.raises(ValueError, match=re.escape(f"SIGReg: {checkpoint / 'sigreg_state.pt'}")
                       if damage == "unreadable" else
                       re.escape(f"in {checkpoint / 'sigreg_state.pt'} ")) as info:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert re.search(message, str(info.value))
    assert "delete sigreg_state.pt to resume with the sketch stream starting over" in str(info.value)
    assert trainer.state.global_step == 0
    assert all(not m._forward_hooks for m in trainer.model.modules())


def test_the_cleanup_after_a_failed_attach_does_not_mask_its_error(tmp_path):
    # A sketch state that does not fit, handed over without the early check: attaching at the
    # first training forward fails, and the cleanup must leave that error as it is.
    trainer = SIGRegTrainer(model=gpt2(), args=lm_args(tmp_path), train_dataset=lm_data(),
                            sigreg=dict(layers="transformer.h.*", pool="flatten", sketch_dim=8))
    trainer.sigreg.load_state_dict({"step": -3, "fixed": {}})
    with pytest.raises(ValueError, match="sketch state in the checkpoint does not fit"):
        trainer.train()
    assert all(not m._forward_hooks for m in trainer.model.modules())


def test_an_encoder_decoder_takes_each_side_its_own_padding_mask():
    """The Trainer's attention_mask is the encoder's: decoder layers take
    decoder_attention_mask (or no mask), not the encoder's."""
    from transformers import BartConfig, BartForConditionalGeneration

    from sigreg.integrations.transformers import _padding_masks

    config = BartConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16)
    model = BartForConditionalGeneration(config)
    handle = sigreg.attach(model, ["model.encoder.layers.*", "model.decoder.layers.*"])
    src, tgt = torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)
    masks = _padding_masks(model, handle, {"attention_mask": src})
    assert masks == {"model.encoder.layers.0": src, "model.decoder.layers.0": None}
    masks = _padding_masks(model, handle, {"attention_mask": src, "decoder_attention_mask": tgt})
    assert masks == {"model.encoder.layers.0": src, "model.decoder.layers.0": tgt}
    handle.set_padding_mask(masks)  # accepted by the handle
    handle.remove()
