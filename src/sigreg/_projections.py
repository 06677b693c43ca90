"""The projection stream of a regularizer: the sketches S (weak) or directions A (strong),
(C, K) with K = ``sketch_dim``, of the layers it regularizes, and their state for exact
resume.

Every :class:`sigreg.modules.Regularizer` owns one, as ``regularizer.projections``; its own
``forward`` and an :func:`sigreg.attach` handle both draw from it, so the same seed and the
same calls give the same projections whichever way it is called. Its ``sketch_policy``:

- ``"fixed"``: layer i's own, drawn once from ``seed + i`` on the CPU, then stacked per
  group of layers and cached on the features' device.
- ``"resample"``: every group's, fresh at every step (a handle's ``loss()``, a module's
  call), drawn in one call from a generator on the features' device seeded with (seed,
  step, group number).

A layer is named in the state by the handle's name for it or, in a module, by its position
in the (flattened) stack: "0", "1", ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ._checks import check_int
from .sketch import mix_seed, seeded_generator

if TYPE_CHECKING:
    from .modules import Regularizer


class LayerProjections:
    """Projections for stacks of layer features, from one regularizer's ``draw``, with its
    ``sketch_policy`` (absent: it projects nothing), ``seed`` and ``sketch_dim``."""

    def __init__(self, regularizer: Regularizer) -> None:
        self.regularizer = regularizer
        self.names: list[str] | None = None  # set by attach(); None: a module's positions
        self.step = 0  # resampled draws so far (one per loss() or module call)
        self.fixed: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple, Any] = {}

    @property
    def sketch_policy(self) -> str | None:
        """``"fixed"``, ``"resample"``, or None for a regularizer that projects nothing."""
        return getattr(self.regularizer, "sketch_policy", None)

    def for_group(self, ordinal: int, layers: tuple[int, ...], z: torch.Tensor):
        """Projections (L, C, K) for the stack z (L, N, C) of calls of ``layers`` (indices
        into the layers, see :meth:`name`), group number ``ordinal`` of this step; None when
        none is needed.

        Raises:
            ValueError if a layer's fixed projection was drawn for another width C.
        """
        if self.sketch_policy == "fixed":
            key = ("fixed", layers, z.shape[-1], z.device)  # the width: a changed one raises
            if key not in self._cache:
                per_layer = [self._fixed(i, z.shape[-1]) for i in layers]
                stacked = None if per_layer[0] is None else torch.stack(per_layer).to(z.device)
                self._cache[key] = stacked
            return self._cache[key]
        if self.sketch_policy == "resample":
            gen = self._generator(z.device)
            gen.manual_seed(mix_seed(mix_seed(self.regularizer.seed, self.step), ordinal))
            return self.regularizer.draw(z.shape[-1], gen, z.device, (len(layers),))
        return None

    def advance(self) -> None:
        """The next step draws the next resampled projections."""
        self.step += 1

    def name(self, layer: int) -> str:
        """Layer ``layer``'s name: the handle's, or its position in a module's stack."""
        return str(layer) if self.names is None else self.names[layer]

    def _fixed(self, layer: int, width: int) -> torch.Tensor | None:
        name = self.name(layer)
        if name not in self.fixed:
            gen = seeded_generator(self.regularizer.seed + layer)
            drawn = self.regularizer.draw(width, gen, "cpu")
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
        """The resample draw count and the fixed projections drawn so far (CPU tensors):
        ``{"step": int, "fixed": {layer name: (C, K) tensor}}``."""
        return {"step": self.step, "fixed": dict(self.fixed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            TypeError if ``state`` or its ``"fixed"`` is not a dict; ValueError for missing or
            unknown keys, a negative step, sketches of layers not regularized here, fixed
            sketches under ``"resample"``, or a sketch that is not (C, K).
        """
        if not isinstance(state, dict):
            raise TypeError(f"a projection state is a dict from state_dict(), got "
                            f"{type(state).__name__}")
        missing, unknown = {"step", "fixed"} - set(state), set(state) - {"step", "fixed"}
        if missing or unknown:
            raise ValueError(
                f"not a projection state: missing keys {sorted(missing)}, unknown keys "
                f"{sorted(unknown)}; expected {{'step': int, 'fixed': {{layer: tensor}}}}"
            )
        step = check_int(state["step"], "state['step']", minimum=0)
        self.step, self.fixed = step, self._checked_fixed(state["fixed"])
        self.clear_cache()

    def _checked_fixed(self, fixed: Any) -> dict[str, torch.Tensor]:
        if not isinstance(fixed, dict):
            raise TypeError(f"state['fixed'] must be a dict of tensors, got {type(fixed).__name__}")
        unknown = [n for n in fixed if not self._is_layer(n)]
        if unknown:
            layers = (f"its layers: {self.names}" if self.names is not None else
                      "a module's layers are its stack positions '0', '1', ...")
            raise ValueError(f"state['fixed'] has sketches for layers {unknown} that are not "
                             f"regularized here ({layers})")
        if fixed and self.sketch_policy != "fixed":
            raise ValueError(f"the state holds fixed sketches, but this sketch_policy "
                             f"is {self.sketch_policy!r}")
        k = getattr(self.regularizer, "sketch_dim", None)
        for name, t in fixed.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != k:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state['fixed'][{name!r}] must be a (C, {k}) tensor, got {shape}")
        return {n: t.cpu() for n, t in fixed.items()}

    def _is_layer(self, name: Any) -> bool:
        if self.names is not None:
            return name in self.names
        return isinstance(name, str) and name.isascii() and name.isdigit()
