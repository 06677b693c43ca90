"""Two gloo processes, each with half a batch, equal one process with all of it."""

import contextlib
import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sigreg


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))


def make_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 10, generator=g), torch.randint(0, 4, (32,), generator=g)


def step(model, handle, x, y, collectives=None):
    """One loss + backward; returns the loss and each parameter's gradient. Counts the
    all-reduces of the regularizer's forward in ``collectives`` if given."""
    out = model(x)
    with counting_all_reduces(collectives):
        loss = handle.combine(nn.functional.cross_entropy(out, y))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@contextlib.contextmanager
def counting_all_reduces(calls):
    if calls is None:
        yield
        return
    original = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1]
    try:
        yield
    finally:
        dist.all_reduce = original


def worker(rank, world, results):
    x, y = make_batch()
    half = slice(rank * 16, (rank + 1) * 16)
    # Functional losses: the global value from each rank's half.
    z = x @ torch.linspace(-1, 1, 10 * 6).reshape(10, 6)
    weak = sigreg.weak_sigreg(z[half]).item()
    strong = sigreg.strong_sigreg(z[half], sigreg.draw_directions(6, 5, sigreg.seeded_generator(0))).item()
    local = sigreg.weak_sigreg(z[half], distributed=False).item()
    stacked = stacked_losses(z[half])
    invariant = sigreg.weak_sigreg(torch.stack([z[half], 50 * z[half] + 9]),
                                   scale_invariant=True).tolist()
    model = make_model()
    handle = sigreg.attach(model, nn.Linear, sketch_dim=8, scale_invariant=True)
    _, grads = step(nn.parallel.DistributedDataParallel(model), handle, x[half], y[half])
    results[rank, "scale_invariant"] = (invariant, grads)
    # A regularized training step under DDP, for each variant.
    for variant in VARIANTS:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        handle = sigreg.attach(model, nn.Linear, variant=variant, sketch_dim=8)
        collectives = []
        loss, grads = step(ddp, handle, x[half], y[half], collectives)
        results[rank, variant] = (weak, strong, local, loss.item(), grads,
                                  handle.layer_losses(), stacked, len(collectives))


VARIANTS = ("weak", "strong", "vicreg")


def on_two_ranks(worker, rendezvous, timeout=None):
    """``worker(rank, 2, results)`` in 2 spawned processes, each in a gloo group: their
    results (``timeout``: the group's, a timedelta; None: torch's default)."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(in_group, args=(worker, 2, str(rendezvous), results, timeout),
                           nprocs=2, start_method="spawn")
        return dict(results)


def in_group(rank, worker, world, rendezvous, results, timeout):
    """One spawned rank: joins the gloo group, runs the worker, leaves."""
    # A file rendezvous: no port to pick, so no race with other processes for one.
    options = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, **options)
    try:
        worker(rank, world, results)
    finally:
        dist.destroy_process_group()
    # Leave without interpreter shutdown once the results are stored: under torch 2.13 a DDP
    # wrapper keeps the Gloo process group (and its worker threads) alive past
    # destroy_process_group(), and a worker thread still releasing a tensor while the
    # interpreter finalizes aborts the process ("terminate called without an active
    # exception"; see sigreg/train/runtime.py). A failure above still raises normally.
    os._exit(0)


def stacked_losses(z):
    """Each loss on a stack of 3 layers (scaled copies of z): one all-reduce per statistic."""
    stack = torch.stack([z, 2 * z + 1, z.tanh()])
    gen = sigreg.seeded_generator(7)
    return [sigreg.weak_sigreg(stack, sigreg.draw_sketch(6, 4, gen, batch=3)).tolist(),
            sigreg.strong_sigreg(stack, sigreg.draw_directions(6, 5, gen, batch=3)).tolist(),
            sigreg.vicreg_varcov(stack).tolist()]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return on_two_ranks(worker, tmp_path_factory.mktemp("ddp") / "rendezvous")


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_equal_one_process(variant, ddp_results):
    results = {rank: ddp_results[rank, variant] for rank in (0, 1)}

    x, y = make_batch()
    z = x @ torch.linspace(-1, 1, 10 * 6).reshape(10, 6)
    weak = sigreg.weak_sigreg(z).item()
    strong = sigreg.strong_sigreg(z, sigreg.draw_directions(6, 5, sigreg.seeded_generator(0))).item()
    model = make_model()
    handle = sigreg.attach(model, nn.Linear, variant=variant, sketch_dim=8)
    loss, grads = step(model, handle, x, y)
    layers = handle.layer_losses()  # widths 24, 24, 4: two groups, the second unsketched
    stacked = stacked_losses(z)

    for rank in (0, 1):
        r_weak, r_strong, r_local, _, r_grads, r_layers, r_stacked, r_collectives = results[rank]
        # Per group (widths 24 and 4), not per layer: the covariance losses reduce the mean
        # (with the count), then the centred products; strong its sums (with the count). Two
        # more exchange the layouts (which layers each rank called), on the CPU.
        assert r_collectives == 2 + {"weak": 4, "strong": 2, "vicreg": 4}[variant]
        assert r_weak == pytest.approx(weak, rel=1e-5)
        assert r_strong == pytest.approx(strong, rel=1e-5)
        assert r_layers == pytest.approx(layers, rel=1e-5)
        for got, want in zip(r_stacked, stacked):
            assert got == pytest.approx(want, rel=1e-5)
        assert r_local != pytest.approx(weak, rel=1e-3)  # opting out really is local
        # The task loss is each rank's local mean, so only the gradients must match globally.
        for g_ddp, g_one in zip(r_grads, grads):
            torch.testing.assert_close(g_ddp, g_one, rtol=1e-4, atol=1e-6)
    # The two ranks' losses average to the single-process loss (same-size halves).
    assert (results[0][3] + results[1][3]) / 2 == pytest.approx(loss.item(), rel=1e-5)


def test_scale_invariant_weak_on_two_ranks_equals_one_process(ddp_results):
    """The root mean square it divides by is the global batch's, as the covariance is."""
    x, y = make_batch()
    z = x @ torch.linspace(-1, 1, 10 * 6).reshape(10, 6)
    want = sigreg.weak_sigreg(torch.stack([z, 50 * z + 9]), scale_invariant=True).tolist()
    model = make_model()
    _, grads = step(model, sigreg.attach(model, nn.Linear, sketch_dim=8, scale_invariant=True),
                    x, y)
    for rank in (0, 1):
        invariant, r_grads = ddp_results[rank, "scale_invariant"]
        assert invariant == pytest.approx(want, rel=1e-5)
        for g_ddp, g_one in zip(r_grads, grads):
            torch.testing.assert_close(g_ddp, g_one, rtol=1e-4, atol=1e-6)


# ---- layers that run on some ranks only (LayerDrop, experts without tokens) ---------------

class Conditional(nn.Module):
    """Three layers of one width; ``forward(x, skip)`` leaves out the layers in ``skip``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x, skip=(), touch_skipped=False):
        for i, layer in enumerate(self.layers):
            if i not in skip:
                x = torch.tanh(layer(x))
            elif touch_skipped:  # FSDP2 reduce-scatters only parameters with a gradient
                x = x + 0 * sum(p.sum() for p in layer.parameters())
        return x


# scenario -> (rank 0's skipped layers, rank 1's, rank 0's rows, rank 1's rows)
SCENARIOS = {
    "each-skips-another": ((2,), (1,), 16, 16),
    "stacks-of-different-sizes": ((), (1, 2), 16, 16),
    "a-layer-no-rank-ran": ((2,), (2,), 16, 16),
    "a-rank-runs-none": ((), (0, 1, 2), 16, 16),
    "one-sample-each": ((), (), 1, 1),
    "one-sample-in-all": ((), (), 1, 0),
}


def conditional_batch(rank, scenario):
    rows = SCENARIOS[scenario][2 + rank]
    return torch.randn(32, 8, generator=torch.Generator().manual_seed(5))[rank * 16:][:rows]


def conditional_worker(rank, world, results):
    for variant in VARIANTS:
        for scenario, skips in SCENARIOS.items():
            model = Conditional()
            handle = sigreg.attach(model, "layers.*", variant, sketch_dim=4,
                                   sketch_policy="fixed")
            model(conditional_batch(rank, scenario), skips[rank])
            collectives = []
            with counting_all_reduces(collectives), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = handle.loss()
            results[rank, variant, scenario] = (
                loss.item(), handle.layer_losses(), len(collectives),
                [str(w.message) for w in caught])


@pytest.fixture(scope="module")
def conditional_results(tmp_path_factory):
    return on_two_ranks(conditional_worker, tmp_path_factory.mktemp("conditional") / "rendezvous")


def expected_layer_values(variant, scenario):
    """Each layer's statistic over the rows of the ranks that ran it, in one process."""
    outputs: dict[int, list[torch.Tensor]] = {}
    for rank in (0, 1):
        model, x = Conditional(), conditional_batch(rank, scenario)
        for i, layer in enumerate(model.layers):
            if i not in SCENARIOS[scenario][rank]:
                h = layer(x)
                outputs.setdefault(i, []).append(h)
                x = torch.tanh(h)
    reference = sigreg.attach(Conditional(), "layers.*", variant, sketch_dim=4,
                              sketch_policy="fixed")
    values = {}
    for i, parts in outputs.items():
        z = torch.cat(parts)[None]
        if z.shape[1] >= 2:
            part = reference._parts[0]
            values[f"layers.{i}"] = part.compute(z, part.projections.for_group(0, (i,), z)).item()
    return values


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_layers_are_matched_by_name_across_ranks(variant, scenario, conditional_results):
    expected = expected_layer_values(variant, scenario)
    results = [conditional_results[rank, variant, scenario] for rank in (0, 1)]
    for loss, layers, _, warned in results:
        assert layers == pytest.approx(expected, rel=1e-5)
        mean = sum(expected.values()) / len(expected) if expected else 0.0
        assert loss == pytest.approx(mean, rel=1e-5)
        assert any("too few" in w for w in warned) == (scenario == "one-sample-in-all")
    assert results[0][2] == results[1][2]  # the same collectives on both ranks


# ---- FSDP2 (fully_shard) ------------------------------------------------------------------

def sharded_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)],
                         nn.Linear(8, 4))


def fsdp_worker(rank, world, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for variant in VARIANTS:
        model = sharded_model()
        handle = sigreg.attach(model, "*.0", variant, sketch_dim=4, sketch_policy="fixed")
        for block in list(model)[:3]:  # each block its own unit, then the root
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x = conditional_batch(rank, "each-skips-another")
        handle.combine(model(x).square().mean()).backward()
        results[rank, variant] = (handle.layer_losses(),
                                  [p.grad.full_tensor() for p in model.parameters()])


def test_fsdp2_sharded_model_equals_one_process(tmp_path):
    """fully_shard on 2 gloo ranks with half a batch each: per-layer values and gradients
    (averaged by FSDP's reduce-scatter) equal one process with the whole batch."""
    results = on_two_ranks(fsdp_worker, tmp_path / "rendezvous")
    for variant in VARIANTS:
        model = sharded_model()
        handle = sigreg.attach(model, "*.0", variant, sketch_dim=4, sketch_policy="fixed")
        x = torch.cat([conditional_batch(rank, "each-skips-another") for rank in (0, 1)])
        handle.combine(model(x).square().mean()).backward()
        for rank in (0, 1):
            layers, grads = results[rank, variant]
            assert layers == pytest.approx(handle.layer_losses(), rel=1e-5)
            for got, want in zip(grads, model.parameters(), strict=True):
                torch.testing.assert_close(got, want.grad, rtol=1e-4, atol=1e-6)


# ---- backward when layers run on some ranks only -------------------------------------------

BACKWARD_SCENARIOS = ("each-skips-another", "stacks-of-different-sizes")
MODES = ("plain", "ddp", "ddp-no-sync", "fsdp2")


def backward_worker(rank, world, results):
    """A combined loss's backward on each rank, the layers skipped differing by rank: plain
    (the gradients averaged here), DDP(find_unused_parameters=True), DDP with a first
    micro-batch under no_sync(), FSDP2 (fully_shard on the root). Every rank must run the
    same collectives in backward, or gloo waits for a peer that never comes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for variant in VARIANTS:
        for scenario in BACKWARD_SCENARIOS:
            for mode in MODES:
                model = Conditional()
                handle = sigreg.attach(model, "layers.*", variant, sketch_dim=4,
                                       sketch_policy="fixed")
                net = model
                if mode.startswith("ddp"):
                    net = nn.parallel.DistributedDataParallel(model,
                                                              find_unused_parameters=True)
                elif mode == "fsdp2":
                    fully_shard(model, mesh=mesh)
                x, skip = conditional_batch(rank, scenario), SCENARIOS[scenario][rank]
                micro = [(x[:8], skip), (x[8:], ())] if mode == "ddp-no-sync" else [(x, skip)]
                for i, (xs, skips) in enumerate(micro):
                    sync = net.no_sync() if i < len(micro) - 1 else contextlib.nullcontext()
                    with sync:
                        out = net(xs, skips, touch_skipped=mode == "fsdp2")
                        handle.combine(out.square().mean()).backward()
                grads = []
                for p in model.parameters():
                    g = p.grad.full_tensor() if mode == "fsdp2" else p.grad
                    g = torch.zeros_like(p) if g is None else g.clone()
                    if mode == "plain":  # what DDP does: the mean over ranks
                        dist.all_reduce(g)
                        g /= world
                    grads.append(g.tolist())
                results[rank, variant, scenario, mode] = grads


@pytest.fixture(scope="module")
def backward_results(tmp_path_factory):
    return on_two_ranks(backward_worker, tmp_path_factory.mktemp("backward") / "rendezvous",
                        timeout=datetime.timedelta(seconds=60))


def one_process_gradients(variant, scenario, mode):
    """One process holding both ranks' batches: each layer's statistic over the rows of the
    ranks that ran it, the task loss the mean of the ranks' means."""
    model = Conditional()
    reference = sigreg.attach(Conditional(), "layers.*", variant, sketch_dim=4, sketch_policy="fixed")
    part = reference._parts[0]
    batches = {rank: conditional_batch(rank, scenario) for rank in (0, 1)}
    skips = {rank: SCENARIOS[scenario][rank] for rank in (0, 1)}
    micro = ([{r: (b[:8], skips[r]) for r, b in batches.items()},
              {r: (b[8:], ()) for r, b in batches.items()}] if mode == "ddp-no-sync"
             else [{r: (b, skips[r]) for r, b in batches.items()}])
    for step_batches in micro:
        outputs: dict[int, list[torch.Tensor]] = {}
        task = 0
        for x, skip in step_batches.values():
            for i, layer in enumerate(model.layers):
                if i not in skip:
                    h = layer(x)
                    outputs.setdefault(i, []).append(h)
                    x = torch.tanh(h)
            task = task + x.square().mean() / 2
        values = []
        for i, parts in sorted(outputs.items()):
            z = torch.cat(parts)[None]
            values.append(part.compute(z, part.projections.for_group(0, (i,), z)))
        reg = torch.cat(values).mean()
        (0.9 * task + 0.1 * reg).backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", BACKWARD_SCENARIOS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_with_layers_run_on_some_ranks_equals_one_process(variant, scenario, mode,
                                                                   backward_results):
    expected = one_process_gradients(variant, scenario, mode)
    for rank in (0, 1):
        got = backward_results[rank, variant, scenario, mode]
        for g, want in zip(got, expected, strict=True):
            torch.testing.assert_close(torch.tensor(g), want, rtol=1e-4, atol=1e-6)
