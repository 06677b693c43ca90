"""The projections (sketches or directions) of the layers an :func:`sigreg.attach` handle
regularizes, and their state for exact resume.

- ``"fixed"``: layer i's own, drawn once from ``seed + i`` on the CPU (the same matrices as
  in earlier versions), then stacked per group of layers and cached on the features' device.
- ``"resample"``: every group's, fresh at every ``loss()``, drawn in one call from a
  generator on the features' device seeded with (seed, loss() count, group number).
"""

from __future__ import annotations

from typing import Any

import torch

from ._checks import check_int
from .modules import Regularizer
from .sketch import mix_seed, seeded_generator


class LayerProjections:
    """Projections for stacks of layer features, from one regularizer's ``draw``."""

    def __init__(self, regularizer: Regularizer, names: list[str], seed: int) -> None:
        self.regularizer = regularizer
        self.names = names
        self.seed = seed
        self.policy = getattr(regularizer, "policy", None)  # None: projects nothing
        self.step = 0  # resampled draws so far (one per loss())
        self.fixed: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple, Any] = {}

    def for_group(self, ordinal: int, layers: tuple[int, ...], z: torch.Tensor):
        """Projections (L, C, K) for the stack z (L, N, C) of calls of ``layers`` (indices
        into ``names``), group number ``ordinal`` of this step; None when none is needed."""
        if self.policy == "fixed":
            key = ("fixed", layers, z.device)
            if key not in self._cache:
                per_layer = [self._fixed(i, z.shape[-1]) for i in layers]
                stacked = None if per_layer[0] is None else torch.stack(per_layer).to(z.device)
                self._cache[key] = stacked
            return self._cache[key]
        if self.policy == "resample":
            gen = self._generator(z.device)
            gen.manual_seed(mix_seed(mix_seed(self.seed, self.step), ordinal))
            return self.regularizer.draw(z.shape[-1], gen, z.device, (len(layers),))
        return None

    def advance(self) -> None:
        """The next loss() draws the next resampled projections."""
        self.step += 1

    def _fixed(self, layer: int, width: int) -> torch.Tensor | None:
        name = self.names[layer]
        if name not in self.fixed:
            drawn = self.regularizer.draw(width, seeded_generator(self.seed + layer), "cpu")
            if drawn is None:
                return None
            self.fixed[name] = drawn
        if self.fixed[name].shape[0] != width:
            raise ValueError(f"layer {name}'s fixed sketch was drawn for width "
                             f"{self.fixed[name].shape[0]}, got features of width {width}")
        return self.fixed[name]

    def _generator(self, device: torch.device) -> torch.Generator:
        key = ("generator", device)
        if key not in self._cache:
            self._cache[key] = torch.Generator(device=device)
        return self._cache[key]

    def clear_cache(self) -> None:
        self._cache.clear()

    def state_dict(self) -> dict[str, Any]:
        """The resample draw count and the fixed projections drawn so far (CPU tensors)."""
        return {"step": self.step, "fixed": dict(self.fixed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; clear errors for anything else."""
        if not isinstance(state, dict):
            raise TypeError(f"a handle state is a dict from state_dict(), got {type(state).__name__}")
        missing, unknown = {"step", "fixed"} - set(state), set(state) - {"step", "fixed"}
        if missing or unknown:
            raise ValueError(
                f"not a SIGRegHandle state: missing keys {sorted(missing)}, unknown keys "
                f"{sorted(unknown)}; expected {{'step': int, 'fixed': {{layer: tensor}}}}"
            )
        step = check_int(state["step"], "state['step']", minimum=0)
        self.step, self.fixed = step, self._checked_fixed(state["fixed"])
        self.clear_cache()

    def _checked_fixed(self, fixed: Any) -> dict[str, torch.Tensor]:
        if not isinstance(fixed, dict):
            raise TypeError(f"state['fixed'] must be a dict of tensors, got {type(fixed).__name__}")
        unknown = sorted(set(fixed) - set(self.names))
        if unknown:
            raise ValueError(f"state['fixed'] has sketches for layers {unknown} that this "
                             f"handle does not regularize (its layers: {self.names})")
        if fixed and self.policy != "fixed":
            raise ValueError(f"the state holds fixed sketches, but this handle's sketch policy "
                             f"is {self.policy!r}")
        k = getattr(self.regularizer, "num_projections", None)
        for name, t in fixed.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != k:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state['fixed'][{name!r}] must be a (C, {k}) tensor, got {shape}")
        return {n: t.cpu() for n, t in fixed.items()}

