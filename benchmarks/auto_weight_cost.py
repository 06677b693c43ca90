"""What ``alpha="auto"`` costs on top of a fixed alpha: training-step time, interleaved.

The ViT-sized transformer of ``overhead.py`` (AdamW, every block regularized, token-mean
pooling) in six arms: weak, strong and VICReg-style, each with a fixed alpha (0.1) and with
``alpha="auto"``. The arms are deep copies of one initialisation with their own optimizer
and hooks. Every round runs the six arms back to back in a random order; the cost of
``auto`` for a variant is the median over rounds of the per-round ratio auto / fixed (robust
to a shared machine's load drifting), with a bootstrap 95 % CI. ``auto`` adds a view per
regularized layer, one tensor hook on the last one's view (three sums each step) and the
fold into the average: no extra backward pass, no device sync. The aten ops of one step
(``op_count.OpCounter``: deterministic, the CPU-side measure of a GPU's launch cost) are
counted for every arm after the timing.

    .venv/bin/python benchmarks/auto_weight_cost.py --json benchmarks/cpu-<date>/auto_weight_cost.json
    .venv/bin/python benchmarks/auto_weight_cost.py --quick --json /tmp/auto.json   # smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import statistics
import time

import torch
from _timing import (
    add_size_arguments,
    bootstrap_ci,
    command_line,
    environment,
    fill_sizes,
    pick_device,
    quantile,
    timed,
    write_json,
)
from op_count import OpCounter
from overhead import CLASSES, ViT, train_step

import sigreg
from sigreg.train.provenance import provenance

VARIANTS = ("weak", "strong", "vicreg")
SIZES = {"steps": (30, 3), "warmup": (3, 1), "batch": (128, 16), "tokens": (64, 16),
         "dim": (256, 64), "depth": (6, 2)}  # (full, --quick)


def make_arms(args, device) -> dict:
    """``"<variant>-<fixed|auto>"`` -> (model, handle, optimizer), copies of one init."""
    torch.manual_seed(args.seed)
    base = ViT(args.dim, args.depth).to(device)
    arms = {}
    for variant in VARIANTS:
        for weighting, alpha in (("fixed", 0.1), ("auto", "auto")):
            model = copy.deepcopy(base)
            sketch = {} if variant == "vicreg" else {"sketch_dim": args.sketch_dim}
            handle = sigreg.attach(model, "encoder.layers.*", variant, pool="mean",
                                   alpha=alpha, **sketch)
            arms[f"{variant}-{weighting}"] = (model, handle,
                                              torch.optim.AdamW(model.parameters(), lr=1e-4))
    return arms


def bench(args, device) -> dict:
    arms = make_arms(args, device)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(args.batch, args.tokens, args.dim, generator=g).to(device)
    y = torch.randint(0, CLASSES, (args.batch,), generator=g).to(device)
    rng = random.Random(args.seed)
    times = {name: [] for name in arms}
    gc.disable()
    try:
        for r in range(args.warmup + args.steps):
            gc.collect()
            order = list(arms)
            rng.shuffle(order)
            for name in order:
                t = timed(train_step, device, arms[name], x, y, False)
                if r >= args.warmup:
                    times[name].append(t)
    finally:
        gc.enable()
    out = {"arms": {name: {"median_ms": 1e3 * statistics.median(ts),
                           "q25_ms": 1e3 * quantile(ts, 0.25), "q75_ms": 1e3 * quantile(ts, 0.75),
                           "times_ms": [1e3 * t for t in ts]} for name, ts in times.items()},
           "ratios": {}}
    for variant in VARIANTS:
        ratios = [a / b for a, b in zip(times[f"{variant}-auto"], times[f"{variant}-fixed"],
                                        strict=True)]
        lo, hi = bootstrap_ci(ratios, seed=args.seed)
        out["ratios"][variant] = {"median": statistics.median(ratios), "ci95_low": lo,
                                  "ci95_high": hi, "q25": quantile(ratios, 0.25),
                                  "q75": quantile(ratios, 0.75)}
    out["final_alpha"] = {name: float(arm[1].weight) for name, arm in arms.items()}
    ops = {}
    for name in arms:
        with OpCounter() as counter:
            train_step(arms[name], x, y, False)
        ops[name] = sum(counter.ops.values())
    out["ops_per_step"] = {variant: {"fixed": ops[f"{variant}-fixed"], "auto": ops[f"{variant}-auto"],
                                     "extra": ops[f"{variant}-auto"] - ops[f"{variant}-fixed"]}
                           for variant in VARIANTS}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (smoke test)")
    add_size_arguments(p, SIZES)
    p.add_argument("--sketch-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    args = p.parse_args(argv)
    fill_sizes(args, SIZES)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(command_line(), flush=True)
    start = time.perf_counter()
    res = {"command": command_line(),
           "config": {k: v for k, v in vars(args).items() if k != "json"},
           "env": environment(device), "provenance": provenance(device), "step_time": bench(args, device)}
    res["elapsed_s"] = time.perf_counter() - start
    for variant, r in res["step_time"]["ratios"].items():
        fixed = res["step_time"]["arms"][f"{variant}-fixed"]["median_ms"]
        ops = res["step_time"]["ops_per_step"][variant]
        print(f"{variant:7s} fixed {fixed:8.1f} ms/step   auto / fixed {r['median']:.3f} "
              f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]   aten ops a step {ops['fixed']} -> "
              f"{ops['auto']} (+{ops['extra']})")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
