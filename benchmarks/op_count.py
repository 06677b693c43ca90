"""Aten ops that one training step gains from ``sigreg.attach``: the CPU-side measure of
what the regularizer costs on a GPU, where a small op is a kernel launch and these
hooks are launch-bound.

The step (forward, mean-square task loss, ``handle.combine``, backward, SGD step) of
torch's own ``nn.TransformerEncoder`` (width 64, 4 heads, every layer attached, token-mean
pooling) runs under a ``TorchDispatchMode`` that counts every aten op, for no regularizer
and for each variant, at two depths. Counting is deterministic: no timing, no noise. The
ops a step gains are fitted as ``per_layer * depth + constant`` from the two depths.

    .venv/bin/python benchmarks/op_count.py                 # a few seconds
    .venv/bin/python benchmarks/op_count.py --sketch-dim 16 --json /tmp/ops.json
    .venv/bin/python benchmarks/op_count.py --sketch-dim 16 --time   # + host CPU time a step
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from _timing import command_line, environment, write_json
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sigreg

WIDTH, HEADS, BATCH, TOKENS = 64, 4, 16, 8
# The targets: extra ops per step <= per_layer * depth + constant.
TARGETS = {"weak": (5, 40), "strong": (6, 60)}
VARIANTS = ("weak", "strong", "vicreg")


class OpCounter(TorchDispatchMode):
    """Counts the aten ops (forward and backward) run inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def encoder(depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


def mlp(depth: int, seed: int = 0) -> nn.Module:
    """``depth`` Linear(32, 32) + ReLU blocks: the smallest model that exercises the hooks, for
    the host time (an encoder's own CPU time would drown the regularizer's)."""
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(depth)])


def make_step(variant: str | None, depth: int, sketch_dim: int | None = 64, tiny: bool = False):
    """One training step of the encoder (``tiny``: of :func:`mlp` on 16 x 32 inputs), as a
    function, with ``variant`` attached to every layer (None: no regularizer), already run
    once (cached constants, lazily drawn sketches)."""
    model = mlp(depth) if tiny else encoder(depth)
    handle = None
    if variant is not None:
        handle = sigreg.attach(model, "*" if tiny else "layers.*", variant, sketch_dim)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    shape = (16, 32) if tiny else (BATCH, TOKENS, WIDTH)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        if handle is not None:
            loss = handle.combine(loss)
        loss.backward()
        opt.step()

    step()
    return step


def step_ops(variant: str | None, depth: int, sketch_dim: int | None = 64) -> collections.Counter:
    """Aten ops of one warm training step, with ``variant`` attached (None: no regularizer)."""
    step = make_step(variant, depth, sketch_dim)
    with OpCounter() as counter:
        step()
    return counter.ops


def host_time(depth: int, sketch_dim: int | None, rounds: int, steps: int) -> dict:
    """Microseconds of CPU time per step that each variant adds to :func:`mlp` (one thread),
    whose arithmetic is negligible: dispatch, Python and autograd, what a GPU step that is
    launch-bound pays on its host. Median over interleaved rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps_of = {v: make_step(v, depth, sketch_dim, tiny=True) for v in (None, *VARIANTS)}
        times: dict = {v: [] for v in steps_of}
        for _ in range(rounds):
            for variant, step in steps_of.items():
                start = time.process_time()
                for _ in range(steps):
                    step()
                times[variant].append(1e6 * (time.process_time() - start) / steps)
    finally:
        torch.set_num_threads(threads)
    none = statistics.median(times.pop(None))
    return {"none_us": none,
            **{v: {"extra_us": statistics.median(t) - none} for v, t in times.items()}}


def extra_ops(variant: str, depth: int, sketch_dim: int | None = 64) -> collections.Counter:
    """Ops the step gains from attaching ``variant`` (a Counter, by op name)."""
    return step_ops(variant, depth, sketch_dim) - step_ops(None, depth, sketch_dim)


def fit(extra: dict[int, int]) -> tuple[float, float]:
    """(ops per layer, constant) through the two depths' totals."""
    (d1, e1), (d2, e2) = sorted(extra.items())
    per_layer = (e2 - e1) / (d2 - d1)
    return per_layer, e1 - per_layer * d1


def measure(depths: tuple[int, int], sketch_dim: int | None) -> dict:
    out = {}
    for variant in VARIANTS:
        counts = {d: extra_ops(variant, d, sketch_dim) for d in depths}
        totals = {d: sum(c.values()) for d, c in counts.items()}
        per_layer, constant = fit(totals)
        row = {"extra_ops": totals, "per_layer": per_layer, "constant": constant,
               "by_op": {d: dict(c.most_common()) for d, c in counts.items()}}
        if variant in TARGETS:
            a, b = TARGETS[variant]
            row["target"] = f"<= {a} per layer + {b}"
            row["pass"] = all(totals[d] <= a * d + b for d in depths)
        out[variant] = row
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depths", default="6,12", help="two encoder depths")
    p.add_argument("--sketch-dim", type=int, default=64,
                   help="K (64 = the width: weak uses no sketch; 16 exercises the sketch)")
    p.add_argument("--time", action="store_true",
                   help="also the CPU time a step of a tiny MLP (the first depth) gains")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds for --time")
    p.add_argument("--quick", action="store_true", help="depths 2,4 (smoke test)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.depths = (2, 4) if args.quick else tuple(int(d) for d in args.depths.split(","))
    if len(args.depths) != 2 or args.depths[0] == args.depths[1]:
        p.error("--depths needs two different depths")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    res = {"command": command_line(), "env": environment(torch.device("cpu")),
           "config": {"width": WIDTH, "heads": HEADS, "batch": BATCH, "tokens": TOKENS,
                      "sketch_dim": args.sketch_dim, "depths": list(args.depths)},
           "variants": measure(args.depths, args.sketch_dim)}
    if args.time:
        res["host_time"] = host_time(args.depths[0], args.sketch_dim,
                                     2 if args.quick else args.rounds, 5 if args.quick else 50)
    print(res["command"])
    print(f"nn.TransformerEncoder width {WIDTH}, {HEADS} heads, input {BATCH}x{TOKENS}x{WIDTH}, "
          f"every layer attached, K={args.sketch_dim}; aten ops one training step gains\n")
    d1, d2 = args.depths
    print(f"   {'variant':<8}{f'depth {d1}':>10}{f'depth {d2}':>10}{'per layer':>11}"
          f"{'constant':>10}  target")
    for variant, r in res["variants"].items():
        target = f"{r['target']}: {'PASS' if r['pass'] else 'FAIL'}" if "target" in r else "-"
        print(f"   {variant:<8}{r['extra_ops'][d1]:>10}{r['extra_ops'][d2]:>10}"
              f"{r['per_layer']:>11.1f}{r['constant']:>10.1f}  {target}")
    if args.time:
        t = res["host_time"]
        print(f"\nCPU time a step of {d1} Linear(32, 32) layers on 16 x 32 inputs gains (one "
              f"thread, median of {args.rounds} rounds; none {t['none_us']:.0f} us a step): "
              + ", ".join(f"{v} +{t[v]['extra_us']:.0f} us" for v in VARIANTS))
    write_json(args.json, res)


if __name__ == "__main__":
    main()
