"""alpha="auto" (sigreg.auto): what the hooks measure, the rule, exact resume, two ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sigreg
from sigreg.auto import AutoWeight
from sigreg.train.config import TrainConfig, apply_overrides

VARIANTS = ("weak", "strong", "vicreg")


class Blocks(nn.Module):
    """Token model: (B, T, C) block outputs, pooled by mean, or 2-D MLP outputs."""

    def __init__(self, tokens: bool) -> None:
        super().__init__()
        self.tokens = tokens
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(12, 12), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1) if self.tokens else x)


def data(tokens: bool, n: int = 32):
    g = torch.Generator().manual_seed(1)
    shape = (n, 5, 12) if tokens else (n, 12)
    return torch.randn(*shape, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hooks_measure_each_loss_gradient_at_the_last_layer_output(variant, tokens):
    # The pending sums after one backward equal the squared norms of d task / dX and
    # d reg / dX at the last regularized layer's output X, computed here by autograd
    # directly (earlier outputs also receive the later layers' regularizer terms).
    torch.manual_seed(0)
    model = Blocks(tokens)
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, out: outputs.append(out))
    handle = sigreg.attach(model, "blocks.*", variant, sketch_dim=6, alpha="auto")
    x, y = data(tokens)
    task = nn.functional.cross_entropy(model(x), y)
    reg = handle.loss()
    d_task = torch.autograd.grad(task, outputs, retain_graph=True)
    d_reg = torch.autograd.grad(reg, outputs, retain_graph=True)
    handle.auto._pending.zero_()  # the hooks saw these grad() calls too
    handle.weigh(task, reg).backward()
    pending = handle.auto._pending
    assert pending[0] == pytest.approx(float(d_task[-1].square().sum()), rel=1e-4)
    assert pending[1] == pytest.approx(float(d_reg[-1].square().sum()), rel=1e-4)
    assert pending[2] == 1  # one output: the last layer's
    assert float(pending[1]) > 0


def test_the_weight_holds_the_share():
    # Same batch, lr 0 (the gradients do not change), no smoothing: after one measurement
    # the regularizer's gradient at the layers is exactly `share` times the task's.
    torch.manual_seed(0)
    model = Blocks(tokens=False)
    handle = sigreg.attach(model, "blocks.*", sketch_dim=6, sketch_policy="fixed",
                           alpha=AutoWeight(share=0.3, smoothing=0.0, bounds=(1e-4, 100),
                                            rate=math.inf))
    x, y = data(False)
    weights = []
    for _ in range(3):
        task = nn.functional.cross_entropy(model(x), y)
        reg = handle.loss()
        weights.append(float(handle.weight))
        handle.weigh(task, reg).backward()
        model.zero_grad()
    assert weights[0] == pytest.approx(0.01 / 1.01)  # the initial w = 0.01
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in model.blocks]
    task = nn.functional.cross_entropy(model(x), y)
    reg = handle.loss()
    for h in hooks:
        h.remove()
    a = handle.weight
    g_task = torch.autograd.grad((1 - a) * task, outputs, retain_graph=True)
    g_reg = torch.autograd.grad(a * reg, outputs)
    share = (g_reg[-1].square().sum() / g_task[-1].square().sum()).sqrt()
    assert float(share) == pytest.approx(0.3, rel=1e-4)
    assert weights[1] == pytest.approx(weights[2], rel=1e-5) != weights[0]


def test_the_rule_and_its_bounds():
    assert AutoWeight().bounds == (1e-4, 1.0)
    assert (AutoWeight().share, AutoWeight().rate, AutoWeight().initial) == (0.125, 1.05, 0.01)
    auto = AutoWeight(share=0.5, smoothing=0.5, initial=0.1, bounds=(0.01, 2.0), rate=math.inf)
    auto._watched, auto._expected, auto._measured = True, 1, 1
    auto._pending = torch.tensor([4.0, 1.0, 1.0])  # m = (2, 0.5): w = 0.5 * sqrt(4) = 1
    auto.settle()
    assert float(auto._w) == pytest.approx(1.0) and auto.weight == pytest.approx(0.5)
    auto._watched, auto._expected, auto._measured = True, 1, 1
    auto._pending = torch.tensor([1000.0, 0.0, 1.0])  # a regularizer with no gradient: w_max
    auto.settle()
    assert float(auto._w) == pytest.approx(2.0)
    auto.settle()  # nothing measured since: nothing changes
    assert float(auto._w) == pytest.approx(2.0) and auto.updates == 2


def test_the_weight_rises_by_at_most_rate_and_falls_at_once():
    auto = AutoWeight(share=0.5, smoothing=0.0, initial=0.1, bounds=(1e-4, 2.0), rate=1.5)
    rule = []
    for g_task, g_reg in [(100.0, 1.0), (100.0, 1.0), (100.0, 0.0), (1.0, 100.0), (4.0, 1.0)]:
        auto._watched, auto._expected, auto._measured = True, 1, 1
        auto._pending = torch.tensor([g_task, g_reg, 1.0])
        auto.settle()
        rule.append(float(auto._w))
    # w* = 5, 5, unbounded, 0.05, 1: up by x1.5 at most (to the bound 2), down at once.
    assert rule == pytest.approx([0.15, 0.225, 0.3375, 0.05, 0.075])


def train_steps(steps: int, state=None, seed: int = 0, start: int = 0):
    """``steps`` AdamW steps with alpha="auto" and resampled sketches, from ``state``
    (model, optimizer, handle) if given; returns the weights and the final state."""
    torch.manual_seed(seed)
    model = Blocks(tokens=True)
    handle = sigreg.attach(model, "blocks.*", "weak", sketch_dim=6, seed=seed,
                           alpha=AutoWeight(share=0.05))  # below the bound: the weight moves
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
        handle.load_state_dict(state[2])
    weights = []
    for i in range(start, start + steps):
        x, y = data(True, 16 + i % 3)  # batches of varying size
        loss = handle.combine(nn.functional.cross_entropy(model(x), y))
        weights.append(float(handle.weight))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weights, (model.state_dict(), opt.state_dict(), handle.state_dict())


def test_a_run_cut_and_resumed_takes_the_weights_of_the_uncut_run(tmp_path):
    uncut, _ = train_steps(8)
    first, state = train_steps(5)  # the state holds the last backward's unfolded gradients
    torch.save(state, tmp_path / "state.pt")
    rest, _ = train_steps(3, torch.load(tmp_path / "state.pt", weights_only=True), start=5)
    assert first + rest == uncut
    assert len(set(uncut)) > 3  # the weight moves
    # Without the weight's state the resumed run does not repeat the uncut one.
    stripped = (*state[:2], {k: v for k, v in state[2].items() if k != "auto"})
    assert train_steps(3, stripped, start=5)[0] != rest


def test_bad_states_and_arguments_are_refused():
    handle = sigreg.attach(Blocks(False), "blocks.*", alpha="auto")
    state = handle.state_dict()
    assert set(state["auto"]) == {"weight", "averages", "pending", "updates", "watched"}
    with pytest.raises(ValueError, match="automatic-weight state"):
        handle.load_state_dict({**state, "auto": {"weight": 1.0}})
    with pytest.raises(ValueError, match="'averages'"):
        handle.load_state_dict({**state, "auto": {**state["auto"], "averages": torch.zeros(3)}})
    with pytest.raises(TypeError, match="'auto'"):
        sigreg.attach(Blocks(False), "blocks.*", alpha="automatic")
    with pytest.raises(ValueError, match="exactly one"):
        sigreg.attach(Blocks(False), "blocks.*", alpha="auto", lam=0.1)
    for bad in (dict(share=0), dict(share=1.5), dict(smoothing=1.0), dict(bounds=(0, 1)),
                dict(initial=1e3), dict(rate=0.9), dict(rate=math.nan)):
        with pytest.raises(ValueError):
            AutoWeight(**bad)
    # A fixed-alpha handle ignores an automatic weight's state; the reverse starts over.
    fixed = sigreg.attach(Blocks(False), "blocks.*", alpha=0.1)
    fixed.load_state_dict(state)
    handle.load_state_dict(fixed.state_dict())
    assert handle.weight == pytest.approx(0.01 / 1.01)


def test_fixed_alpha_is_unchanged():
    # A fixed alpha records no views and keeps its exact combination.
    torch.manual_seed(0)
    model = Blocks(False)
    handle = sigreg.attach(model, "blocks.*", alpha=0.3)
    x, y = data(False)
    task = nn.functional.cross_entropy(model(x), y)
    loss = handle.combine(task)
    assert handle.weight == 0.3 and handle.auto is None
    assert loss == 0.7 * task + 0.3 * handle._last_values.mean()
    assert not handle._capture.measure


def test_no_backward_warns_and_keeps_the_weight():
    model = Blocks(False)
    handle = sigreg.attach(model, "blocks.*", alpha="auto")
    x, y = data(False)
    handle.combine(nn.functional.cross_entropy(model(x), y))  # no backward
    with pytest.warns(UserWarning, match="measured no gradient"):
        handle.combine(nn.functional.cross_entropy(model(x), y))
    assert handle.weight == pytest.approx(0.01 / 1.01)


def test_setting_alpha_auto():
    cfg = apply_overrides(TrainConfig(sigreg="weak"), ["alpha=auto"])
    assert cfg.alpha == "auto"
    assert TrainConfig.from_dict(cfg.to_dict()).alpha == "auto"
    assert apply_overrides(TrainConfig(), ["alpha=0.3"]).alpha == 0.3
    for bad, message in (("alpha=fast", "alpha expects a number"),
                         ("alpha=1.5", "alpha must be a number in")):
        with pytest.raises(ValueError, match=message):
            apply_overrides(TrainConfig(), [bad])
    with pytest.raises(ValueError, match="compile"):
        apply_overrides(TrainConfig(), ["alpha=auto", "compile=true"])


# ---------------------------------------------------------------------- two gloo ranks
def worker(rank, world, rendezvous, results):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        model = Blocks(tokens=True)
        ddp = nn.parallel.DistributedDataParallel(model)
        handle = sigreg.attach(model, "blocks.*", "weak", sketch_dim=6,
                               alpha=AutoWeight(share=0.05))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = data(True)
        half = slice(rank * 16, (rank + 1) * 16)
        weights = []
        for _ in range(4):
            loss = handle.combine(nn.functional.cross_entropy(ddp(x[half]), y[half]))
            weights.append(float(handle.weight))
            opt.zero_grad()
            loss.backward()
            opt.step()
        handle.settle()
        results[rank] = weights + [float(handle.weight)]
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/test_distributed.py: DDP's gloo threads and interpreter exit


def test_two_ranks_take_the_same_weight_as_one_process(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(worker, args=(2, tmp_path / "rendezvous", results), nprocs=2, join=True)
    torch.manual_seed(0)
    model = Blocks(tokens=True)
    handle = sigreg.attach(model, "blocks.*", "weak", sketch_dim=6,
                           alpha=AutoWeight(share=0.05), distributed=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(True)
    single = []
    for _ in range(4):
        # Under DDP each rank's loss is the mean over its half and gradients are averaged:
        # the same as the mean over the whole batch.
        loss = handle.combine(nn.functional.cross_entropy(model(x), y))
        single.append(float(handle.weight))
        opt.zero_grad()
        loss.backward()
        opt.step()
    handle.settle()
    single.append(float(handle.weight))
    assert results[0] == results[1]  # every rank takes the same weight
    assert results[0] == pytest.approx(single, rel=1e-4)
    assert len(set(single)) > 2
