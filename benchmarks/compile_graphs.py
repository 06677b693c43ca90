"""What attach does to a compiled model: graphs, graph breaks, recompilations, step time.

For two models, every block attached (none / weak / strong SIGReg):
- ``mlp``: 6 blocks of Linear(256, 256) + ReLU in an nn.Sequential, the Linears attached
  (their outputs (N, C) are the features);
- ``vit``: benchmarks/overhead.py's ViT-sized encoder (torch's nn.TransformerEncoder, 6
  layers of width 256, a ModuleList looped over in Python), every layer attached with
  token-mean pooling.

1. Graphs, breaks and the ops inside graphs: ``torch._dynamo.explain`` of one training-mode
   forward (ops outside them run eagerly), and whether
   ``torch.compile(model, fullgraph=True)`` compiles it (no break allowed).
2. Recompilations: frames compiled after the first training step and after the last of
   ``--steps`` (forward, ``handle.loss()``, backward), counted by a counting backend; equal
   means nothing recompiled once the first step was compiled.
3. Compiled step time (inductor, model compiled, the regularizer eager): the arms
   interleaved, each round running every arm once in a random order; the ratio arm/none
   is the median over rounds of the per-round ratio, with a bootstrap 95 % CI.

    .venv/bin/python benchmarks/compile_graphs.py --json /tmp/compile_graphs.json
    .venv/bin/python benchmarks/compile_graphs.py --quick          # smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
import torch._dynamo
import torch.nn.functional as F
from _timing import bootstrap_ci, command_line, environment, pick_device, timed, write_json
from overhead import ViT
from torch import nn
from torch._dynamo.testing import CompileCounter

import sigreg

ARMS = ("none", "weak", "strong")
MODELS = ("mlp", "vit")
# (full, quick)
SIZES = {"width": (256, 32), "depth": (6, 2), "batch": (128, 8), "tokens": (64, 8),
         "rounds": (10, 2), "warmup": (2, 1)}


def build(name: str, arm: str, args: argparse.Namespace, device: torch.device):
    """(model, handle or None, input, target): one initialisation for every arm."""
    torch.manual_seed(args.seed)
    if name == "mlp":
        model = nn.Sequential(*[nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU())
                                for _ in range(args.depth)], nn.Linear(args.width, 10))
        layers, x = "*.0", torch.randn(args.batch, args.width)
    else:
        model = ViT(args.width, args.depth)
        layers, x = "encoder.layers.*", torch.randn(args.batch, args.tokens, args.width)
    model = model.to(device).train()
    handle = None if arm == "none" else sigreg.attach(model, layers, arm, args.sketch_dim)
    return model, handle, x.to(device), torch.randint(0, 10, (args.batch,)).to(device)


def step(net: nn.Module, handle, x: torch.Tensor, y: torch.Tensor, opt=None) -> None:
    loss = F.cross_entropy(net(x), y)
    if handle is not None:
        loss = handle.combine(loss)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    if opt is not None:
        opt.step()


def graphs(name: str, arm: str, args, device) -> dict:
    torch.compiler.reset()
    model, handle, x, y = build(name, arm, args, device)
    explained = torch._dynamo.explain(model)(x)
    if handle is not None:
        handle.clear()  # explain ran a training forward
    torch.compiler.reset()
    try:
        fullgraph = torch.compile(model, backend="eager", fullgraph=True)
        step(fullgraph, handle, x, y)
        fullgraph_ok = True
    except Exception as exc:  # noqa: BLE001 - the error is the measurement
        fullgraph_ok = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    torch.compiler.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    step(compiled, handle, x, y)
    after_first = counter.frame_count
    for _ in range(args.steps - 1):
        step(compiled, handle, x, y)
    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "ops_in_graphs": explained.op_count,
            "break_reasons": sorted({str(r.reason).splitlines()[0][:120]
                                     for r in explained.break_reasons}),
            "fullgraph": fullgraph_ok, "frames_after_first_step": after_first,
            "frames_after_last_step": counter.frame_count, "steps": args.steps}


def step_times(name: str, args, device) -> dict:
    torch.compiler.reset()
    arms = {}
    for arm in ARMS:
        model, handle, x, y = build(name, arm, args, device)
        arms[arm] = (torch.compile(model), handle, x, y,
                     torch.optim.AdamW(model.parameters(), lr=1e-4))
    rng, times = random.Random(args.seed), {arm: [] for arm in ARMS}
    for r in range(args.warmup + args.rounds):  # the first warm-up round compiles
        order = list(ARMS)
        rng.shuffle(order)
        for arm in order:
            t = timed(step, device, *arms[arm])
            if r >= args.warmup:
                times[arm].append(t)
    out = {arm: {"median_ms": 1e3 * statistics.median(ts)} for arm, ts in times.items()}
    for arm in ARMS[1:]:
        ratios = [a / b for a, b in zip(times[arm], times["none"], strict=True)]
        lo, hi = bootstrap_ci(ratios, seed=args.seed)
        out[arm].update(ratio=statistics.median(ratios), ci95_low=lo, ci95_high=hi)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--device", default="auto")
    p.add_argument("--sketch-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="training steps counted for recompiles")
    p.add_argument("--no-timing", action="store_true", help="graphs and recompiles only")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be at least 2, got {args.steps}")
    for key, (full, quick) in SIZES.items():
        setattr(args, key, quick if args.quick else full)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    env = environment(device)
    print(f"torch {env['torch']}, {env['device']}, {env['threads']} threads")
    result = {"command": command_line(), "env": env, "models": {}}
    for name in args.models:
        rows = {arm: graphs(name, arm, args, device) for arm in ARMS}
        print(f"\n{name}: graphs, breaks, ops in graphs, fullgraph=True, frames after step 1 "
              f"/ {args.steps}")
        for arm, r in rows.items():
            print(f"   {arm:7s} {r['graphs']:3d} {r['graph_breaks']:3d} {r['ops_in_graphs']:4d}  "
                  f"{'ok' if r['fullgraph'] is True else r['fullgraph']}  "
                  f"{r['frames_after_first_step']} / {r['frames_after_last_step']}")
            for reason in r["break_reasons"]:
                print(f"            break: {reason}")
        result["models"][name] = {"graphs": rows}
        if not args.no_timing:
            times = step_times(name, args, device)
            result["models"][name]["compiled_step"] = times
            print(f"   compiled step: none {times['none']['median_ms']:.2f} ms; " + "; ".join(
                f"{arm}/none {times[arm]['ratio']:.3f} ({times[arm]['ci95_low']:.3f}-"
                f"{times[arm]['ci95_high']:.3f})" for arm in ARMS[1:]))
        write_json(args.json, result)  # after every model: a run cut short keeps the others'
    write_json(args.json, result)


if __name__ == "__main__":
    main()
