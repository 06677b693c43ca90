"""What every integration shares: attach SIGReg when training starts, combine once per
training forward, and turn the per-layer values and effective dimensions into log entries."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from .._renamed import translate
from ..attach import FeatureRecorder, LayerSpec, Pool, SIGRegHandle, attach
from ..diagnostics import effective_dimension


class SIGRegSession:
    """:func:`sigreg.attach` settings, and the hooks while a training run holds them.

    Sketch state (fixed sketches, resample counters) survives :meth:`detach`, so a second
    ``fit`` on the same object continues the sketch stream instead of repeating it.
    """

    def __init__(self, layers: LayerSpec | list[LayerSpec], variant: str = "weak",
                 sketch_dim: int | None = 64, pool: Pool = "mean", **attach_kwargs: Any) -> None:
        # A renamed keyword warns here, where the settings are given, not at each fit.
        attach_kwargs = translate(attach_kwargs, attach.renamed_keywords, "sigreg.attach",
                                  stacklevel=4)
        self.options = dict(layers=layers, variant=variant, sketch_dim=sketch_dim, pool=pool,
                            **attach_kwargs)
        self.handle: SIGRegHandle | None = None
        self._recorder: FeatureRecorder | None = None
        self._recording = contextlib.ExitStack()
        self._state: dict[str, Any] | None = None
        self._state_from = ("the checkpoint", "resume from another checkpoint")  # for errors

    @property
    def attached(self) -> bool:
        return self.handle is not None

    def attach(self, model: nn.Module) -> SIGRegHandle:
        """Place the hooks on ``model`` (and restore sketch state saved earlier).

        A wrapper (DDP, FSDP) whose forward re-enters ``model`` to run the step needs nothing
        special: a forward counts where a hooked layer records, which the outer call does not.
        """
        if self.handle is not None:
            raise RuntimeError("SIGReg is already attached; detach() it first")
        handle = attach(model, **self.options)
        try:
            self._restore(handle)
            recorder = FeatureRecorder(model, handle.names, self.options["pool"])
        except BaseException:
            handle.remove()  # nothing half-attached for detach() to trip over
            raise
        self.handle, self._recorder = handle, recorder
        return handle

    def detach(self) -> None:
        """Remove every hook; the model is as before :meth:`attach`. Safe to call twice."""
        self._recording.close()
        handle, recorder = self.handle, self._recorder
        self.handle, self._recorder = None, None
        if handle is not None:
            self._state = handle.state_dict()
            handle.remove()
        if recorder is not None:
            recorder.remove()

    def detach_after_error(self) -> None:
        """:meth:`detach` on the way out of a run that failed: a failure of the cleanup itself
        becomes a warning, so the error that stopped the run is the one raised."""
        try:
            self.detach()
        except Exception as exc:  # noqa: BLE001 - reported, the original error goes on
            warnings.warn(f"SIGReg: removing the hooks after the error failed too ({exc!r})",
                          stacklevel=2)

    def combine(self, task_loss: torch.Tensor, reg_scale: float = 1.0) -> torch.Tensor:
        """``handle.combine(task_loss)``, with the regularizer's share multiplied by ``reg_scale``.

        ``combine(task / s) * s`` equals ``(1 - a) task + a s reg`` (or ``task + l s reg``): the
        scale touches only the regularizer, through the handle's public ``combine``.
        """
        if reg_scale == 1.0:
            return self.handle.combine(task_loss)
        return self.handle.combine(task_loss / reg_scale) * reg_scale

    def settle(self) -> None:
        """``alpha="auto"``: fold the latest backward's gradients into the weight (see
        :meth:`SIGRegHandle.settle`; a collective under torch.distributed)."""
        if self.handle is not None:
            self.handle.settle()

    def auto_alpha(self) -> torch.Tensor | None:
        """Under ``alpha="auto"``, the alpha of the latest combine (0-d tensor); else None."""
        auto = self.handle.auto if self.handle is not None else None
        return None if auto is None else auto.alpha

    def set_padding_mask(self, mask: Any) -> None:
        """The (B, T) padding mask of the next training forward, or a mapping from layer
        specs to masks (see :meth:`SIGRegHandle.set_padding_mask`)."""
        self.handle.set_padding_mask(mask)

    def skip_recorded(self) -> None:
        """Drop what the hooks recorded and was not combined (a step trained without SIGReg)."""
        self.handle.clear()

    def layer_values(self) -> dict[str, torch.Tensor]:
        """Detached per-layer regularizer values of the latest combine (no device sync)."""
        return self.handle.layer_loss_tensors()

    def start_recording(self) -> None:
        """Keep the pooled features of the next training forward for :meth:`stop_recording`."""
        self._recording.close()
        self._recording.enter_context(self._recorder.recording())

    def stop_recording(self) -> dict[str, float]:
        """Effective dimension per layer of the features recorded since :meth:`start_recording`
        (empty if nothing was recorded)."""
        self._recording.close()
        if self._recorder is None:
            return {}
        dims = {n: effective_dimension(z) for n, z in self._recorder.features.items()
                if z.shape[0] >= 2}
        self._recorder.features = {}
        return dims

    def state_dict(self) -> dict[str, Any] | None:
        """Sketch state for a checkpoint (None before the first attach)."""
        return self.handle.state_dict() if self.handle is not None else self._state

    def load_state_dict(self, state: dict[str, Any] | None, source: str = "the checkpoint",
                        advice: str = "resume from another checkpoint") -> None:
        """Restore sketch state now if attached, else at the next :meth:`attach`. A state
        that does not fit raises a ValueError naming ``source`` (where it was read) and
        ``advice`` (what to do)."""
        self._state, self._state_from = state, (source, advice)
        if self.handle is not None:
            self._restore(self.handle)

    def check_state(self, model: nn.Module) -> None:
        """Raise now, not at the first training step, if the sketch state given to
        :meth:`load_state_dict` does not fit these settings on ``model``."""
        if self._state is not None:
            handle = attach(model, **self.options)
            try:
                self._restore(handle)
            finally:
                handle.remove()

    def _restore(self, handle: SIGRegHandle) -> None:
        if self._state is None:
            return
        try:
            handle.load_state_dict(self._state)
        except (TypeError, ValueError) as exc:
            source, advice = self._state_from
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"SIGReg: the sketch state in {source} does not fit these settings "
                             f"({first}): {advice}") from exc


def log_entries(prefix: str, layer_values: dict[str, Any], eff_dims: dict[str, float],
                alpha: Any = None) -> dict:
    """Log keys shared by every integration: ``{prefix}/loss`` (mean over layers, the value
    ``combine`` used), ``{prefix}/loss/<layer>``, ``{prefix}/eff_dim/<layer>`` and, under
    ``alpha="auto"``, ``{prefix}/alpha``, the weight in effect."""
    out: dict[str, Any] = {} if alpha is None else {f"{prefix}/alpha": alpha}
    if layer_values:
        values = list(layer_values.values())
        out[f"{prefix}/loss"] = sum(values) / len(values)
        out.update({f"{prefix}/loss/{n}": v for n, v in layer_values.items()})
    out.update({f"{prefix}/eff_dim/{n}": v for n, v in eff_dims.items()})
    return out
