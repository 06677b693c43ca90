"""Optimizers (SGD, AdamW, Muon + AdamW) and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import TrainConfig


class MultiOptimizer:
    """Several optimizers stepped together (Muon for matrices, AdamW for the rest)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = [o for o in optimizers if o.param_groups]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """Muon's share: 2-D weights of hidden layers, not the input embedding or the head."""
    return param.ndim == 2 and not name.startswith("head.") and "embed" not in name


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> MultiOptimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            [p for _, p in params], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        return MultiOptimizer(opt)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(
            [p for _, p in params], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        return MultiOptimizer(opt)
    if cfg.optimizer == "muon":
        matrices = [p for n, p in params if is_hidden_matrix(n, p)]
        others = [p for n, p in params if not is_hidden_matrix(n, p)]
        muon = torch.optim.Muon(matrices, lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
        adamw = torch.optim.AdamW(
            others, lr=cfg.lr, betas=cfg.muon_adamw_betas, weight_decay=cfg.weight_decay
        )
        return MultiOptimizer(muon, adamw)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd, adamw or muon")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, floor: float) -> float:
    """Multiplier of each group's base learning rate at ``step`` (0-based).

    Linear warm-up over ``warmup_steps``, then cosine from 1 down to ``floor`` at the last
    step (``floor = eta_min / lr``), or constant.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """Sets every param group's lr from its base lr and :func:`lr_factor`."""

    def __init__(self, optimizer: MultiOptimizer, cfg: TrainConfig, steps_per_epoch: int) -> None:
        # Keep the optimizer, not its groups: load_state_dict replaces the group dicts.
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.total = cfg.epochs * steps_per_epoch
        self.warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.schedule = cfg.schedule
        self.floor = cfg.eta_min / cfg.lr if cfg.lr > 0 else 0.0

    def set(self, step: int) -> float:
        factor = lr_factor(step, self.total, self.warmup, self.schedule, self.floor)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * factor
        return factor
