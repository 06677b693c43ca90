"""SIGReg for the Hugging Face ``Trainer``: a ``compute_loss`` mixin and a ready Trainer.

    from sigreg.integrations.transformers import SIGRegTrainer

    trainer = SIGRegTrainer(
        model=model, args=args, train_dataset=train,
        sigreg=dict(layers="transformer.h.*", pool="flatten", alpha=0.01),  # a language model
    )
    trainer.train()

``sigreg`` holds :func:`sigreg.attach`'s settings (layer names are those of
``trainer.model``; ``pool="cls"`` for a ViT's CLS token, ``"flatten"`` to treat every token
as a sample; tuple outputs use their first element), plus ``log_prefix`` (default
``"sigreg"``) and ``log_eff_dim`` (default True). They are checked when the Trainer is
built: an unknown key, or a value :func:`sigreg.attach` refuses for ``trainer.model``,
raises there. Without ``sigreg`` the Trainer is the plain one (a baseline). To add SIGReg
to another Trainer subclass, put :class:`SIGRegMixin` first:
``class MyTrainer(SIGRegMixin, Seq2SeqTrainer)``; its ``compute_loss`` may lack
``return_outputs`` or ``num_items_in_batch``, or return the bare loss even when asked for
outputs.

The hooks are attached at the first training forward of ``train()`` and removed when it
returns or fails; evaluation and prediction never compute the regularizer. The training
loss is the combined loss; each log adds ``sigreg/task_loss`` (the task loss alone, on the
scale of ``loss``, to compare with a baseline), ``sigreg/loss`` and ``sigreg/loss/<layer>``
(means since the previous log) and ``sigreg/eff_dim/<layer>``, the effective dimension of
the features of the first batch after the previous log (on rank 0 under DDP). Gradient
accumulation keeps the regularizer's weight: when the Trainer does not divide the loss by
the accumulation steps (models that take ``num_items_in_batch``), the regularizer is divided
here. DDP (torchrun / accelerate) uses global-batch statistics as :func:`sigreg.attach`;
``DataParallel`` (several GPUs, one process) is not supported. With
``gradient_checkpointing=True`` and no ``use_reentrant`` in ``gradient_checkpointing_kwargs``,
the args get ``use_reentrant=False``: the reentrant variant hides the layers from the hooks.
A batch's ``attention_mask`` (B, T) is the padding mask of its forward: ``pool="mean"`` and
``"flatten"`` take the real tokens only (regularized layers must then output (B, T, C) of the
inputs' length). In an encoder-decoder (``model.config.is_encoder_decoder``) it applies to
the encoder's layers only; the decoder's take ``decoder_attention_mask`` when the batch has
one, else all their tokens.

Every checkpoint folder the Trainer saves gets ``sigreg_state.pt``, the sketch stream's
state, and ``train(resume_from_checkpoint=...)`` restores it: a resumed run draws the
sketches an uninterrupted one would (a checkpoint without the file resumes with a warning,
the stream starting over; a file that cannot be read, or does not fit the ``sigreg``
settings, is a ValueError naming it, before training starts).
"""

from __future__ import annotations

import inspect
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._extras import require
from .._renamed import translate
from ..attach import attach
from ..modules import VARIANT_OPTIONS
from ._session import SIGRegSession, log_entries

require("transformers", "sigreg.integrations.transformers")

from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

__all__ = ["SIGRegMixin", "SIGRegTrainer"]

SKETCH_STATE = "sigreg_state.pt"


class _SaveSketchState(TrainerCallback):
    """Writes the sketch state into each checkpoint folder, after the Trainer saved it."""

    def __init__(self, session: SIGRegSession) -> None:
        self.session = session

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # alpha="auto": the next weight, on every process, before a checkpoint is saved.
        self.session.settle()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        sketch_state = self.session.state_dict()
        if sketch_state is None:  # SIGReg was never attached
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():  # a hyper-parameter search saves elsewhere
            warnings.warn(f"SIGReg: no checkpoint folder {folder} to save the sketch state in; "
                          "a run resumed from this checkpoint restarts the sketch stream",
                          stacklevel=2)
            return
        # Temporary file, then rename: a crash never leaves a half-written state behind.
        tmp = folder / (SKETCH_STATE + ".tmp")
        torch.save(sketch_state, tmp)
        os.replace(tmp, folder / SKETCH_STATE)


def _checked_keys(sigreg: Mapping[str, Any]) -> dict[str, Any]:
    """``sigreg`` as a dict, if it has ``layers`` and only keys that :func:`sigreg.attach`
    (its regularizers' options included) or the mixin take.

    Raises:
        TypeError: ``sigreg`` is not a mapping, lacks ``layers``, or has an unknown key (the
            message lists every valid key).
    """
    if not isinstance(sigreg, Mapping):
        raise TypeError(f"sigreg must be a dict of sigreg.attach settings, got {sigreg!r}")
    sigreg = translate(dict(sigreg), attach.renamed_keywords, "sigreg.attach", stacklevel=5)
    params = inspect.signature(attach).parameters
    named = [n for n, p in params.items() if n != "model" and p.kind is not p.VAR_KEYWORD]
    variant_options = [o for options in VARIANT_OPTIONS.values() for o in options]
    valid = [*dict.fromkeys([*named, *variant_options]), "log_prefix", "log_eff_dim"]
    unknown = [k for k in sigreg if k not in valid]
    if unknown:
        raise TypeError(f"sigreg= has unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
    if "layers" not in sigreg:
        raise TypeError("sigreg= needs 'layers', the layers to regularize (see sigreg.attach)")
    return dict(sigreg)


def _prefer_non_reentrant_checkpointing(args: Any) -> None:
    """``use_reentrant=False`` for the Trainer's activation checkpointing, unless the user
    chose: reentrant checkpointing runs the layers under no_grad, unseen by the hooks."""
    kwargs = args.gradient_checkpointing_kwargs or {}
    if args.gradient_checkpointing and "use_reentrant" not in kwargs:
        args.gradient_checkpointing_kwargs = {**kwargs, "use_reentrant": False}


def _keywords(compute_loss: Any) -> set[str]:
    """Which of ``return_outputs`` and ``num_items_in_batch`` a ``compute_loss`` accepts."""
    params = inspect.signature(compute_loss).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {n for n in ("return_outputs", "num_items_in_batch") if takes_any or n in params}


class SIGRegMixin:
    """``compute_loss`` and ``log`` for a ``transformers.Trainer`` subclass; list it first.

    Args:
        sigreg: keyword arguments of :func:`sigreg.attach` (``layers`` is required), plus
            ``log_prefix`` and ``log_eff_dim``; None (the default): the base Trainer, unchanged.

    Raises:
        TypeError: ``sigreg`` has an unknown key (the message lists the valid ones) or no
            ``layers``.
        TypeError / ValueError: :func:`sigreg.attach`'s own error for a bad value, such as
            a ``layers`` spec matching no module of the model.
        ValueError: DataParallel (``n_gpu > 1`` in one process).

    Examples:
        >>> from transformers import Trainer
        >>> from sigreg.integrations.transformers import SIGRegMixin
        >>> class MyTrainer(SIGRegMixin, Trainer):   # any Trainer subclass: the mixin first
        ...     pass
        >>> [cls.__name__ for cls in MyTrainer.__mro__[:3]]
        ['MyTrainer', 'SIGRegMixin', 'Trainer']
    """

    def __init__(self, *args: Any, sigreg: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sigreg_base_keywords = _keywords(super().compute_loss)
        self.sigreg: SIGRegSession | None = None
        if sigreg is not None:
            self._set_up_sigreg(sigreg)

    def _set_up_sigreg(self, sigreg: Mapping[str, Any]) -> None:
        options = _checked_keys(sigreg)
        self.sigreg_log_prefix: str = options.pop("log_prefix", "sigreg")
        self.sigreg_log_eff_dim: bool = options.pop("log_eff_dim", True)
        if getattr(self.args, "n_gpu", 1) > 1:
            raise ValueError("SIGReg hooks do not support DataParallel (n_gpu > 1 in one process);"
                             " launch with torchrun or accelerate for DDP")
        self.sigreg = SIGRegSession(**options)
        # Attach and remove at once: a bad setting raises now, not when train() starts.
        attach(self.model, **self.sigreg.options).remove()
        _prefer_non_reentrant_checkpointing(self.args)
        self.add_callback(_SaveSketchState(self.sigreg))
        self._reset_window()

    def _reset_window(self) -> None:
        # Running sums since the last log, kept as tensors (no sync): per-layer values, task loss.
        self._sigreg_sums: dict[str, torch.Tensor] = {}
        self._sigreg_task_sum: torch.Tensor | int = 0
        self._sigreg_count = 0
        self._sigreg_alpha_sum: torch.Tensor | None = None  # alpha="auto": weights used
        self._sigreg_measure = self.sigreg_log_eff_dim
        self._sigreg_eff_dims: dict[str, float] = {}

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        """``Trainer.train``; resuming also restores the sketch state of the checkpoint."""
        if self.sigreg is None:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: the Trainer says so
        if isinstance(checkpoint, (str, os.PathLike)):
            self._load_sketch_state(Path(checkpoint))
        try:
            result = super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            self.sigreg.detach_after_error()  # the error that stopped training is the one raised
            self._reset_window()
            raise
        self.sigreg.detach()
        self._reset_window()
        return result

    def _load_sketch_state(self, checkpoint: Path) -> None:
        """The checkpoint's sketch state, checked against these settings before training."""
        path = checkpoint / SKETCH_STATE
        if not path.is_file():
            warnings.warn(f"SIGReg: {checkpoint} has no {SKETCH_STATE} (saved without SIGReg, "
                          "or by an older sigreg): the sketch stream starts over", stacklevel=3)
            return
        advice = (f"delete {SKETCH_STATE} to resume with the sketch stream starting over, or "
                  "resume from another checkpoint")
        try:
            state = torch.load(path, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"SIGReg: {path} cannot be read ({type(exc).__name__}: {first}); "
                             f"{advice}") from exc
        self.sigreg.load_state_dict(state, str(path), advice)
        self.sigreg.check_state(self.model)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """The base Trainer's loss, plus SIGReg on training forwards (outside them, unchanged).

        Returned as the base returns it: ``(loss, outputs)``, or the bare loss of a base that
        gives nothing else, even when asked for outputs.
        """
        if self.sigreg is None or not (model.training and torch.is_grad_enabled()):
            return self._base_compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._start_training_forward(inputs)
        result = self._base_compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if isinstance(result, torch.Tensor):
            return self._regularize(result, num_items_in_batch)
        loss, outputs = result
        return self._regularize(loss, num_items_in_batch), outputs

    def _base_compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool,
                           num_items_in_batch: torch.Tensor | int | None) -> Any:
        # Only the keywords the base's signature takes: some compute_loss have neither.
        given = dict(return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        keywords = {k: v for k, v in given.items() if k in self._sigreg_base_keywords}
        return super().compute_loss(model, inputs, **keywords)

    def _start_training_forward(self, inputs: Any) -> None:
        if not self.sigreg.attached:
            self.sigreg.attach(self.model)
        self.sigreg.skip_recorded()  # training-mode calls of the model outside compute_loss
        # Padded text: the statistics take the real tokens only.
        self.sigreg.set_padding_mask(_padding_masks(self.model, self.sigreg.handle, inputs))
        if self._sigreg_measure:
            self.sigreg.start_recording()

    def _regularize(self, task_loss: torch.Tensor,
                    num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
        if self._sigreg_measure:
            self._sigreg_eff_dims = self.sigreg.stop_recording()
            self._sigreg_measure = False
        scale = self._sigreg_scale(num_items_in_batch)
        loss = self.sigreg.combine(task_loss, reg_scale=scale)
        alpha = self.sigreg.auto_alpha()
        if alpha is not None:
            total = self._sigreg_alpha_sum
            self._sigreg_alpha_sum = alpha if total is None else total + alpha
        for name, value in self.sigreg.layer_values().items():
            self._sigreg_sums[name] = self._sigreg_sums.get(name, 0) + value
        # Undo the pre-normalization by the accumulation steps: the scale of the Trainer's "loss".
        self._sigreg_task_sum = self._sigreg_task_sum + task_loss.detach() / scale
        self._sigreg_count += 1
        return loss

    def _sigreg_scale(self, num_items_in_batch: torch.Tensor | int | None) -> float:
        # Trainer.training_step divides the loss by the accumulation steps only in this case;
        # otherwise the task loss arrives pre-normalized and the regularizer must be divided here.
        divides = ((not self.model_accepts_loss_kwargs or num_items_in_batch is None)
                   and self.compute_loss_func is None)
        return 1.0 if divides else 1.0 / self.current_gradient_accumulation_steps

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the SIGReg entries to training logs (those with ``"loss"``), then log."""
        if self.sigreg is not None and "loss" in logs and self._sigreg_count:
            logs = {**logs, **self._sigreg_logs()}
            self._reset_window()
        super().log(logs, *args, **kwargs)

    def _sigreg_logs(self) -> dict[str, float]:
        """Means over the training forwards since the previous log, and the eff. dimensions."""
        count = self._sigreg_count
        # Over all processes, as the Trainer averages its "loss" (the layer values are global).
        task = nested_gather(self._sigreg_task_sum, self.args.parallel_mode).mean()
        means = {n: float(s) / count for n, s in self._sigreg_sums.items()}
        alpha = self._sigreg_alpha_sum  # alpha="auto": the mean weight since the last log
        return {f"{self.sigreg_log_prefix}/task_loss": float(task) / count,
                **log_entries(self.sigreg_log_prefix, means, self._sigreg_eff_dims,
                              None if alpha is None else float(alpha) / count)}


class SIGRegTrainer(SIGRegMixin, Trainer):
    """``transformers.Trainer`` with SIGReg; takes ``sigreg=dict(layers=..., ...)`` (without
    it, the plain Trainer: a baseline run needs no other class).

    Examples:
        The settings are checked when the Trainer is built (``train()`` then trains as any
        Trainer does):

        >>> import torch
        >>> from torch import nn
        >>> from transformers import TrainingArguments
        >>> from sigreg.integrations.transformers import SIGRegTrainer
        >>> class Classifier(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layers = nn.ModuleList([nn.Linear(8, 32), nn.Linear(32, 32)])
        ...         self.head = nn.Linear(32, 2)
        ...     def forward(self, x, labels=None):
        ...         for layer in self.layers:
        ...             x = torch.relu(layer(x))
        ...         logits = self.head(x)
        ...         return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}
        >>> args = TrainingArguments("hf-out", report_to=[], use_cpu=True)
        >>> trainer = SIGRegTrainer(model=Classifier(), args=args,
        ...                         sigreg=dict(layers="layers.*", sketch_dim=16, alpha=0.1))
        >>> SIGRegTrainer(model=Classifier(), args=args, sigreg=dict(layer="layers.*"))
        Traceback (most recent call last):
        TypeError: sigreg= has unknown key(s) ['layer']; valid keys: layers, variant, ...
    """


def _mask_of(inputs: Any, key: str) -> torch.Tensor | None:
    mask = inputs.get(key) if isinstance(inputs, Mapping) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _padding_masks(model: nn.Module, handle: Any, inputs: Any) -> Any:
    """The batch's padding mask: ``attention_mask``; for an encoder-decoder, per layer:
    ``attention_mask`` for the encoder's layers, ``decoder_attention_mask`` (or none) for
    the others."""
    mask = _mask_of(inputs, "attention_mask")
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(config, "is_encoder_decoder", False) or get_encoder is None or handle is None:
        return mask
    encoder = {id(m) for m in get_encoder().modules()}
    modules = dict(model.named_modules())
    decoder_mask = _mask_of(inputs, "decoder_attention_mask")
    return {name: mask if id(modules[name]) in encoder else decoder_mask
            for name in handle.names}
