"""sigreg.integrations.lightning: a few steps of Lightning fit against a hand-written loop."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sigreg

L = pytest.importorskip(
    "lightning.pytorch", reason="needs the [lightning] extra: pip install -e '.[lightning]'")
from lightning.pytorch.loggers import CSVLogger, Logger

from sigreg.integrations.lightning import SIGRegCallback, regularize, set_padding_mask

SETTINGS = dict(layers=nn.Linear, sketch_dim=8, alpha=0.5)
LAYERS = ["net.0", "net.2", "net.4"]


class Classifier(L.LightningModule):
    def __init__(self, call_regularize: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                                 nn.Linear(24, 4))
        self.call_regularize = call_regularize

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        return regularize(self, loss) if self.call_regularize else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 10, generator=g), torch.randint(0, 4, (n,), generator=g))


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: what TensorBoard or W&B would have received."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    name, version = "memory", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append({"step": step, **metrics})

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class GradCapture(L.Callback):
    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.clone() for p in pl_module.parameters()])


def fit(module, callbacks, steps=1, **trainer_kwargs):
    capture = GradCapture()
    logger = trainer_kwargs.pop("logger", MemoryLogger())
    trainer = L.Trainer(
        max_steps=steps, callbacks=[*callbacks, capture], logger=logger, log_every_n_steps=1,
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(module, DataLoader(data(), batch_size=32))
    return trainer, capture.grads, logger


def reference(module: Classifier, regularized: bool):
    """One step of the README's plain loop: gradients and the per-layer values."""
    x, y = data().tensors
    handle = sigreg.attach(module, **SETTINGS) if regularized else None
    loss = nn.functional.cross_entropy(module(x), y)
    layers = {}
    if handle is not None:
        loss = handle.combine(loss)
        layers = handle.layer_losses()
        handle.remove()
    loss.backward()
    return [p.grad.clone() for p in module.parameters()], layers


def test_fit_trains_on_sigreg_and_logs_it_per_layer():
    module = Classifier()
    plain_grads, _ = reference(copy.deepcopy(module), regularized=False)
    ref_grads, ref_layers = reference(copy.deepcopy(module), regularized=True)
    callback = SIGRegCallback(**SETTINGS)
    _, grads, logger = fit(module, [callback])

    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads[0], ref_grads, strict=True))
    assert not all(torch.allclose(g, p, atol=1e-4) for g, p in zip(grads[0], plain_grads, strict=True))
    row = logger.rows[0]
    assert set(ref_layers) == set(LAYERS)
    for name in LAYERS:
        assert row[f"sigreg/loss/{name}"] == pytest.approx(ref_layers[name], rel=1e-5)
        assert 1.0 <= row[f"sigreg/eff_dim/{name}"] <= 24
    assert row["sigreg/loss"] == pytest.approx(sum(ref_layers.values()) / 3, rel=1e-5)
    # The hooks are gone after fit; the sketch state is kept for checkpoints.
    assert all(not m._forward_hooks for m in module.modules())
    assert callback.state_dict()["sketch_state"] is not None


def test_alpha_auto_takes_the_weights_of_the_plain_loop():
    # The callback settles the weight after every batch and logs it; the weights are those
    # of the README's plain loop with alpha="auto" (SGD, the same batch each step).
    module = Classifier()
    plain = copy.deepcopy(module)
    _, _, logger = fit(module, [SIGRegCallback(**{**SETTINGS, "alpha": "auto"})], steps=3)
    handle = sigreg.attach(plain, **{**SETTINGS, "alpha": "auto"})
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    x, y = data().tensors
    weights = []
    for _ in range(3):
        loss = handle.combine(nn.functional.cross_entropy(plain(x), y))
        weights.append(float(handle.weight))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert [float(row["sigreg/alpha"]) for row in logger.rows if "sigreg/alpha" in row] == \
        pytest.approx(weights, rel=1e-5)
    assert weights[0] != weights[1]  # it moved


def test_without_callback_regularize_returns_the_task_loss():
    module = Classifier()
    plain_grads, _ = reference(copy.deepcopy(module), regularized=False)
    _, grads, logger = fit(module, [])
    assert all(torch.allclose(g, p, atol=1e-6) for g, p in zip(grads[0], plain_grads, strict=True))
    assert not any(k.startswith("sigreg/") for row in logger.rows for k in row)


def test_warns_when_training_step_skips_regularize():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, logger = fit(Classifier(call_regularize=False), [SIGRegCallback(**SETTINGS)], steps=2)
    assert sum("did not return regularize" in str(w.message) for w in caught) == 1
    assert not any(k.startswith("sigreg/") for row in logger.rows for k in row)


def test_eff_dim_only_on_the_steps_lightning_writes():
    trainer_logger = MemoryLogger()
    module = Classifier()
    trainer = L.Trainer(
        max_steps=4, callbacks=[SIGRegCallback(**SETTINGS)], logger=trainer_logger,
        log_every_n_steps=2, accelerator="cpu", enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data(), batch_size=8))
    rows = trainer_logger.rows
    assert [r["step"] for r in rows] == [1, 3]
    assert all(f"sigreg/eff_dim/{n}" in r and f"sigreg/loss/{n}" in r for r in rows for n in LAYERS)


def test_ddp_two_ranks_regularize_the_global_batch(tmp_path):
    """DDP, 2 gloo ranks with 16 samples each: the same step as one process with 32.

    ``ddp_fork``: forked ranks leave through os._exit, not interpreter shutdown, which a DDP
    wrapper's leaked Gloo threads can abort under torch 2.13 (see sigreg/train/runtime.py).
    """
    module = Classifier()
    ref = copy.deepcopy(module)
    ref_grads, ref_layers = reference(copy.deepcopy(module), regularized=True)
    trainer = L.Trainer(
        max_steps=1, callbacks=[SIGRegCallback(**SETTINGS)], strategy="ddp_fork",
        accelerator="cpu", devices=2, logger=CSVLogger(tmp_path), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    # Lightning's distributed sampler gives each rank every other sample; shuffle=False keeps it.
    trainer.fit(module, DataLoader(data(), batch_size=16))

    metrics = trainer.callback_metrics
    for name in LAYERS:
        assert float(metrics[f"sigreg/loss/{name}"]) == pytest.approx(ref_layers[name], rel=1e-5)
    # The weights rank 0 ends with, sent back to this process: one SGD step of the reference.
    for p, r, g in zip(module.parameters(), ref.parameters(), ref_grads, strict=True):
        assert torch.allclose(p, r - 0.1 * g, atol=1e-6)
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "sigreg/eff_dim/net.0" in logged.splitlines()[0]


def test_resumed_fit_draws_the_sketches_an_uninterrupted_one_would(tmp_path):
    _, straight, _ = fit(Classifier(), [SIGRegCallback(**SETTINGS)], steps=2)
    trainer, _, _ = fit(Classifier(), [SIGRegCallback(**SETTINGS)], steps=1)
    trainer.save_checkpoint(tmp_path / "step1.ckpt")
    capture = GradCapture()
    resumed = L.Trainer(
        max_steps=2, callbacks=[SIGRegCallback(**SETTINGS), capture], logger=False,
        accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False)
    resumed.fit(Classifier(), DataLoader(data(), batch_size=32), ckpt_path=tmp_path / "step1.ckpt")
    # Same weights and batch at step 2 either way; a restarted sketch stream would differ.
    assert len(capture.grads) == 1
    assert all(torch.allclose(g, r, atol=1e-6)
               for g, r in zip(capture.grads[0], straight[1], strict=True))


class Tagger(L.LightningModule):
    """Token tagging on right-padded sequences; the mask reaches the pooling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))

    def training_step(self, batch, batch_idx):
        ids, mask, tags = batch
        set_padding_mask(self, mask)
        logits = self(ids)
        loss = nn.functional.cross_entropy(logits[mask.bool()], tags[mask.bool()])
        return regularize(self, loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def padded_tags(length: int) -> TensorDataset:
    """Four sequences of 2-5 tokens, the same for every ``length`` >= 5, padded with id 0."""
    g = torch.Generator().manual_seed(2)
    ids, tags = torch.randint(1, 16, (4, 5), generator=g), torch.randint(0, 3, (4, 5), generator=g)
    mask = (torch.arange(length)[None] < torch.tensor([3, 5, 2, 4])[:, None]).long()
    pad = torch.zeros(4, length - 5, dtype=torch.long)
    return TensorDataset(torch.cat([ids, pad], 1) * mask, mask, torch.cat([tags, pad], 1))


def test_padding_mask_leaves_the_regularizer_as_without_padding(tmp_path):
    """The same tokens padded to 5 or 9 give the same sigreg/loss with the mask set."""
    logged = []
    for length in (5, 9):
        logger = MemoryLogger()
        trainer = L.Trainer(max_steps=1, callbacks=[SIGRegCallback("mix", pool="flatten",
                                                                   sketch_dim=4)],
                            accelerator="cpu", logger=logger, log_every_n_steps=1,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(Tagger(), DataLoader(padded_tags(length), batch_size=4))
        logged.append(next(r["sigreg/loss"] for r in logger.rows if "sigreg/loss" in r))
    assert logged[1] == pytest.approx(logged[0], rel=1e-6)


@pytest.mark.parametrize("damage", [{"step": -3, "fixed": {}}, "not a state"])
def test_a_damaged_sketch_state_in_a_checkpoint_is_named_not_masked(damage, tmp_path):
    trainer, _, _ = fit(Classifier(), [SIGRegCallback(**SETTINGS)], steps=1)
    trainer.save_checkpoint(tmp_path / "step1.ckpt")
    saved = torch.load(tmp_path / "step1.ckpt", weights_only=False)
    (key,) = [k for k in saved["callbacks"] if k.startswith("SIGRegCallback")]
    saved["callbacks"][key]["sketch_state"] = damage
    torch.save(saved, tmp_path / "damaged.ckpt")
    module = Classifier()
    resumed = L.Trainer(
        max_steps=2, callbacks=[SIGRegCallback(**SETTINGS)], logger=False, accelerator="cpu",
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"SIGReg: the sketch state in the checkpoint "
                       r"\(SIGRegCallback's sketch_state\) does not fit these settings .*: resume "
                       "with the SIGRegCallback settings it was saved with"):
        resumed.fit(module, DataLoader(data(), batch_size=32), ckpt_path=tmp_path / "damaged.ckpt")
    assert all(not m._forward_hooks for m in module.modules())  # cleaned up all the same
