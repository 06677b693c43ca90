"""SIGReg for PyTorch Lightning: a callback, plus one line in ``training_step``.

    from sigreg.integrations.lightning import SIGRegCallback, regularize

    class Model(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return regularize(self, F.cross_entropy(self(x), y))   # the one line

    trainer = L.Trainer(callbacks=[SIGRegCallback("blocks.*", alpha=0.1)])

The callback attaches the hooks when ``fit`` starts (after the strategy moved and wrapped
the model) and removes them when it ends or fails. Through the module's logger it logs
``sigreg/loss`` and ``sigreg/loss/<layer>`` every training batch (Lightning writes them
every ``log_every_n_steps``) and ``sigreg/eff_dim/<layer>``, the effective dimension of
each layer's features, on the batches whose logs Lightning writes. Without the callback,
:func:`regularize` returns the task loss unchanged, so one module trains with and without
SIGReg. Under DDP strategies the regularizer sees the global batch (see
:func:`sigreg.attach`); the effective dimension is each rank's batch, averaged over ranks.
Sketch state is saved in checkpoints, so a resumed run draws the same sketches. For padded
token batches, call ``set_padding_mask(self, attention_mask)`` before the forward.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .._extras import require
from ..attach import LayerSpec, Pool
from ._session import SIGRegSession, log_entries

require("lightning", "sigreg.integrations.lightning")

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["SIGRegCallback", "regularize", "set_padding_mask"]

# The callback training each module: regularize(self, loss) finds it without an attribute
# on the user's module (weak keys: a finished module is not kept alive).
_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, SIGRegCallback] = weakref.WeakKeyDictionary()


def regularize(module: pl.LightningModule, task_loss: torch.Tensor) -> torch.Tensor:
    """The loss to return from ``training_step``: task loss plus SIGReg of this forward.

    Call it once per training forward. Without a :class:`SIGRegCallback` fitting ``module``
    it returns ``task_loss`` unchanged.

    Examples:
        >>> import lightning.pytorch as pl, torch
        >>> from sigreg.integrations.lightning import regularize
        >>> task = torch.tensor(0.7)
        >>> regularize(pl.LightningModule(), task) is task   # no callback: the baseline
        True
    """
    callback = _ACTIVE.get(module)
    return task_loss if callback is None else callback.combine(task_loss)


def set_padding_mask(module: pl.LightningModule, mask: Any) -> None:
    """Before the forward of a padded batch in ``training_step``: the (B, T) mask, true at
    real tokens, so that pooling takes those only, or a mapping from layer specs to masks
    (see :meth:`sigreg.SIGRegHandle.set_padding_mask`). Without a :class:`SIGRegCallback`
    fitting ``module``, nothing.

    Examples:
        >>> import lightning.pytorch as pl, torch
        >>> from sigreg.integrations.lightning import regularize, set_padding_mask
        >>> class Encoder(pl.LightningModule):
        ...     def training_step(self, batch, batch_idx):
        ...         set_padding_mask(self, batch["attention_mask"])   # (B, T), before
        ...         hidden = self(batch["input_ids"])
        ...         return regularize(self, self.task_loss(hidden, batch["labels"]))
        >>> set_padding_mask(pl.LightningModule(), torch.ones(4, 10))   # no callback: nothing
    """
    callback = _ACTIVE.get(module)
    if callback is not None:
        callback.session.set_padding_mask(mask)


class SIGRegCallback(pl.Callback):
    """Attach SIGReg to ``layers`` of the LightningModule for the duration of ``fit``.

    Args:
        layers: the layers to regularize, as in :func:`sigreg.attach` (names are those of
            the LightningModule: ``"model.blocks.*"`` for a ``self.model``).
        variant: as in :func:`sigreg.attach`.
        sketch_dim: as in :func:`sigreg.attach`.
        pool: as in :func:`sigreg.attach` (``pool="flatten"`` or ``"cls"`` for token
            models; tuple outputs use their first element).
        log_prefix: first part of every logged key.
        log_eff_dim: also log each layer's effective dimension (one (C, C) covariance per
            layer on logging steps).
        attach_kwargs: the rest of :func:`sigreg.attach`'s settings (``alpha``, ``lam``,
            ``sketch_policy``, ``seed``, ``distributed``, ``t_max``, ``num_points``, ...).

    Examples:
        >>> import lightning.pytorch as pl, torch
        >>> from torch import nn
        >>> from sigreg.integrations.lightning import SIGRegCallback, regularize
        >>> class Classifier(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         task = nn.functional.cross_entropy(self.net(x), y)
        ...         return regularize(self, task)              # the one line
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> _ = torch.manual_seed(0)
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
        >>> callback = SIGRegCallback("net.0", sketch_dim=16, alpha=0.1)
        >>> trainer = pl.Trainer(max_steps=2, callbacks=[callback], accelerator="cpu",
        ...                      logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=32))
        >>> trainer.global_step
        2
    """

    def __init__(self, layers: LayerSpec | list[LayerSpec], variant: str = "weak",
                 sketch_dim: int | None = 64, pool: Pool = "mean", *, log_prefix: str = "sigreg",
                 log_eff_dim: bool = True, **attach_kwargs: Any) -> None:
        self.session = SIGRegSession(layers, variant, sketch_dim, pool, **attach_kwargs)
        self.log_prefix = log_prefix
        self.log_eff_dim = log_eff_dim
        self._combined = False
        self._warned = False

    def combine(self, task_loss: torch.Tensor) -> torch.Tensor:
        """Used by :func:`regularize`: the regularized loss of the current training forward."""
        self._combined = True
        return self.session.combine(task_loss)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module in _ACTIVE:
            raise RuntimeError("a SIGRegCallback already regularizes this module; pass one only")
        self.session.attach(pl_module)
        _ACTIVE[pl_module] = self

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._combined = False
        self.session.skip_recorded()
        # Lightning's own monitors (LearningRateMonitor, DeviceStatsMonitor) ask the same.
        if self.log_eff_dim and trainer._logger_connector.should_update_logs:
            self.session.start_recording()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        eff_dims = self.session.stop_recording()
        alpha = self.session.auto_alpha()  # alpha="auto": the weight this batch trained with
        self.session.settle()  # ... and the next one, on every rank, before any save
        if not self._combined:
            if not self._warned:
                rank_zero_warn("SIGRegCallback: training_step did not return "
                               "regularize(self, loss), so SIGReg is not trained on")
                self._warned = True
            return
        values = log_entries(self.log_prefix, self.session.layer_values(), {}, alpha)
        pl_module.log_dict(values, on_step=True, on_epoch=False)
        if eff_dims:
            # Each rank measured its own batch: average them (the losses are global already).
            pl_module.log_dict(log_entries(self.log_prefix, {}, eff_dims), on_step=True,
                               on_epoch=False, sync_dist=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._detach(pl_module, after_error=True)

    def _detach(self, pl_module: pl.LightningModule, after_error: bool = False) -> None:
        if _ACTIVE.get(pl_module) is self:
            del _ACTIVE[pl_module]
        if after_error:  # the error that stopped fit is the one to see
            self.session.detach_after_error()
        else:
            self.session.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"sketch_state": self.session.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(
            state_dict.get("sketch_state"), "the checkpoint (SIGRegCallback's sketch_state)",
            "resume with the SIGRegCallback settings it was saved with, or from another "
            "checkpoint")
