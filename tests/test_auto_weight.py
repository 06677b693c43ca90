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
def test_hooks_measure_the_regularizer_gradient_at_the_last_layer_output(variant, tokens):
    # After one backward the pending sums are <g, X>, |g|^2, |X|^2 and X's number of entries
    # for X the last regularized layer's output and g the gradient the regularizer alone
    # sends it (as it enters the combined loss: alpha * d reg / dX), computed here by
    # autograd directly.
    torch.manual_seed(0)
    model = Blocks(tokens)
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, out: outputs.append(out))
    handle = sigreg.attach(model, "blocks.*", variant, sketch_dim=6, alpha="auto")
    x, y = data(tokens)
    task = nn.functional.cross_entropy(model(x), y)
    reg = handle.loss()
    g = 0.1 * torch.autograd.grad(reg, outputs, retain_graph=True)[-1]
    handle.auto._pending.zero_()  # the hooks saw this grad() call too
    handle.weigh(task, reg).backward()
    dot, gg, xx, entries, count = handle.auto._pending.tolist()
    last = outputs[-1].detach()
    assert dot == pytest.approx(float((g * last).sum()), rel=1e-4, abs=1e-9)
    assert gg == pytest.approx(float(g.square().sum()), rel=1e-4)
    assert xx == pytest.approx(float(last.square().sum()), rel=1e-4)
    assert entries == last.numel() and count == 1 and gg > 0  # one output: the last layer's


def radial_cosine(scale: float, form: str = "weak") -> float:
    """The first measurement of the rule on a linear layer whose features have spread
    ``scale`` and one dominant direction (a task's low-rank features)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.copy_(scale * torch.diag(torch.linspace(0.05, 3.0, 16)))
        model[0].bias.zero_()
    handle = sigreg.attach(model, ["0"], form, sketch_dim=8, alpha="auto")
    handle.combine(model(torch.randn(256, 16)).sum() * 0).backward()
    handle.settle()
    return float(handle.auto._average) / (1 - handle.auto.smoothing)


def test_the_regularizer_pushes_dead_features_out_and_pulls_large_ones_in():
    # What the rule reads: weak SIGReg's gradient grows features far below unit power (a
    # dead layer: cosine < 0) and shrinks anisotropic ones whose largest variances exceed 1
    # (cosine > 0: it buys isotropy with their power).
    assert radial_cosine(1e-3) < -0.5
    assert radial_cosine(2.0) > 0.1


def measured(auto: AutoWeight, cosine: float, power: float = 0.01) -> float:
    """Fold one measurement with this radial cosine and mean square; the new w."""
    auto._watched, auto._expected, auto._measured = True, 1, 1
    auto._pending = torch.tensor([2 * cosine * power ** 0.5, 4.0, power, 1.0, 1.0])
    auto.settle()
    return float(auto._w)


def test_the_rule_and_its_bounds():
    auto = AutoWeight()
    assert (auto.base, auto.high, auto.smoothing, auto.rate) == (0.1, 0.5, 0.9, 1.05)
    assert auto.weight == pytest.approx(0.1)
    auto = AutoWeight(base=0.1, high=0.2, smoothing=0.0, rate=1.5)
    rule = [measured(auto, c) for c in (-0.5, -0.5, -0.5, 0.5, 0.5, 0.5, 0.25)]
    w0, w1 = 0.1 / 0.9, 0.2 / 0.8  # the bounds, in w = alpha / (1 - alpha)
    # Outward below unit power: up by x1.5 per update to the high bound; inward: down by it
    # to the base.
    assert rule == pytest.approx([1.5 * w0, w1, w1, w1 / 1.5, w0, w0, w0])
    auto.settle()  # nothing measured since: nothing changes
    assert float(auto._w) == pytest.approx(w0) and auto.updates == 7
    # Outward at unit power or above is no dead layer: the weight does not rise.
    assert measured(auto, -0.5, power=1.0) == pytest.approx(w0)
    assert measured(auto, -0.5, power=0.99) == pytest.approx(1.5 * w0)
    smooth = AutoWeight(smoothing=0.5)
    measured(smooth, -0.5)  # average -0.25: up
    assert measured(smooth, 0.3) == pytest.approx(0.1 / 0.9)  # average 0.025: down
    assert float(smooth._average) == pytest.approx(0.025)


def train_steps(steps: int, state=None, seed: int = 0, start: int = 0):
    """``steps`` AdamW steps with alpha="auto" and resampled sketches, from ``state``
    (model, optimizer, handle) if given; returns the weights and the final state."""
    torch.manual_seed(seed)
    model = Blocks(tokens=True)
    handle = sigreg.attach(model, "blocks.*", "weak", sketch_dim=6, seed=seed,
                           alpha="auto")
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
    assert set(state["auto"]) == {"weight", "average", "pending", "updates", "watched"}
    with pytest.raises(ValueError, match="automatic-weight state"):
        handle.load_state_dict({**state, "auto": {"weight": 1.0}})
    with pytest.raises(ValueError, match="'pending'"):
        handle.load_state_dict({**state, "auto": {**state["auto"], "pending": torch.zeros(4)}})
    with pytest.raises(TypeError, match="'auto'"):
        sigreg.attach(Blocks(False), "blocks.*", alpha="automatic")
    with pytest.raises(ValueError, match="exactly one"):
        sigreg.attach(Blocks(False), "blocks.*", alpha="auto", lam=0.1)
    for bad in (dict(base=0), dict(base=0.6), dict(high=0.05), dict(high=0.7),
                dict(smoothing=1.0), dict(rate=1.0), dict(rate=math.inf), dict(rate=math.nan)):
        with pytest.raises(ValueError):
            AutoWeight(**bad)
    # A fixed-alpha handle ignores an automatic weight's state; the reverse starts over.
    fixed = sigreg.attach(Blocks(False), "blocks.*", alpha=0.1)
    fixed.load_state_dict(state)
    handle.load_state_dict(fixed.state_dict())
    assert handle.weight == pytest.approx(0.1)


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
    assert handle.weight == pytest.approx(0.1)


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
                               alpha="auto")
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
                           alpha="auto", distributed=False)
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
