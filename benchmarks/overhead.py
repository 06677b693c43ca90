"""What SIGReg costs: training-step time overhead, and weak-SIGReg memory (sketch vs full).

1. Step time of a ViT-sized transformer trained with AdamW, in three arms: no
   regularizer, weak SIGReg (K=64) and strong SIGReg (64 directions, 17 points), attached
   to every block with token-mean pooling. The arms are deep copies of one initialisation,
   each with its own optimizer and hooks, so no arm runs another arm's hooks. They are
   interleaved: every round runs the three arms (and the weak / strong hooks alone, outside
   the model) back to back in a random order, and the overhead is the median over rounds
   of the per-round ratio arm/none (robust to the load of a shared machine drifting during
   the run), with a bootstrap 95% CI.
2. Forward+backward of ``sigreg.weak_sigreg(z, sketch)`` alone on z (N, C), with a K=64
   sketch and with the full C x C covariance: median time (in this process, after a
   warm-up call) and peak memory of one call in a fresh subprocess per case. On CUDA, peak
   memory is torch.cuda.max_memory_allocated above what was allocated before the call. On
   CPU (Linux) it is the rise of the peak resident set VmHWM, reset just before the call,
   over the resident set VmRSS before it, with glibc's mmap threshold pinned at 64 KiB so
   that every large tensor gets fresh pages and returns them when freed. (ru_maxrss would
   not do: a child's ru_maxrss starts at its parent's resident set, inherited at fork.)

    .venv/bin/python benchmarks/overhead.py     # ~100 s on 2 quiet CPU cores, more when busy
    .venv/bin/python benchmarks/overhead.py --quick --json /tmp/overhead.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _timing import (
    add_size_arguments,
    bootstrap_ci,
    command_line,
    environment,
    fill_sizes,
    pick_device,
    quantile,
    sync,
    timed,
    write_json,
)
from torch import nn

import sigreg

TARGETS = {"weak": 1.01, "strong": 1.02}  # the cost targets: at most 1 % and 2 % slower than no regularizer
HEADS = 8
CLASSES = 10
# Settings that --quick changes; everything else is shared. (full, quick)
SIZES = {
    "steps": (25, 3),
    "warmup": (3, 1),
    "batch": (128, 16),
    "tokens": (64, 16),
    "dim": (256, 64),
    "depth": (6, 2),
    "mem_channels": ("1024,4096", "512"),
    "mem_batch": (256, 64),
    "mem_repeats": (5, 2),
}


class ViT(nn.Module):
    """Pre-norm transformer encoder on (B, T, dim) tokens, mean-pooled, linear head."""

    def __init__(self, dim: int, depth: int, heads: int = HEADS, classes: int = CLASSES):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def make_arms(args, device):
    """name -> (model, handle or None, optimizer); three copies of one initialisation."""
    torch.manual_seed(args.seed)
    base = ViT(args.dim, args.depth).to(device)
    variants = {
        "none": None,
        "weak": {"variant": "weak"},
        "strong": {"variant": "strong", "num_points": 17},
    }
    arms = {}
    for name, kw in variants.items():
        model = copy.deepcopy(base)
        handle = None
        if kw is not None:
            handle = sigreg.attach(
                model, "encoder.layers.*", sketch_dim=args.sketch_dim, pool="mean", **kw
            )
        arms[name] = (model, handle, torch.optim.AdamW(model.parameters(), lr=1e-4))
    return arms


def train_step(arm, x, y, amp: bool) -> None:
    model, handle, opt = arm
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(x), y)
    if handle is not None:
        loss = handle.combine(loss)
    loss.backward()
    opt.step()


def hooks_alone(reg: nn.Module, depth: int, h: torch.Tensor) -> None:
    """What SIGReg adds to a step, run outside the model on one (B, T, C) tensor: token-mean
    pooling for each block, the stack of the blocks' features, the batched regularizer of
    all of them (fresh sketches / directions drawn in one call included), their mean and
    the backward through all of it into h."""
    h.grad = None
    reg(torch.stack([h.mean(1) for _ in range(depth)])).mean().backward()


def bench_step_time(args, device) -> dict:
    arms = make_arms(args, device)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(args.batch, args.tokens, args.dim, generator=g).to(device)
    y = torch.randint(0, CLASSES, (args.batch,), generator=g).to(device)
    h = torch.randn(args.batch, args.tokens, args.dim, generator=g).to(device).requires_grad_()
    # Every round times each job once, in a random order: the three training arms, and the
    # hooks of the weak and strong arms alone (so both see the same machine load).
    jobs = {name: (train_step, (arm, x, y, args.amp)) for name, arm in arms.items()}
    for name, (_, handle, _) in arms.items():
        if handle is not None:
            jobs[name + "_hooks"] = (hooks_alone, (handle.regularizer, args.depth, h))
    rng = random.Random(args.seed)
    times = {name: [] for name in jobs}
    gc.disable()
    try:
        for r in range(args.warmup + args.steps):
            gc.collect()
            order = list(jobs)
            rng.shuffle(order)
            for name in order:
                fn, fn_args = jobs[name]
                t = timed(fn, device, *fn_args)
                if r >= args.warmup:
                    times[name].append(t)
    finally:
        gc.enable()

    out = {"arms": {}, "ratios": {}}
    for name in arms:
        ms = [1e3 * t for t in times[name]]
        hooks = times.get(name + "_hooks")
        out["arms"][name] = {
            "median_ms": statistics.median(ms),
            "q25_ms": quantile(ms, 0.25),
            "q75_ms": quantile(ms, 0.75),
            "hooks_alone_ms": 1e3 * statistics.median(hooks) if hooks else 0.0,
            "times_ms": ms,
        }
    for name, target in TARGETS.items():
        ratios = [a / b for a, b in zip(times[name], times["none"])]
        lo, hi = bootstrap_ci(ratios, seed=args.seed)
        med = statistics.median(ratios)
        out["ratios"][name] = {
            "median": med,
            "ci95_low": lo,
            "ci95_high": hi,
            "q25": quantile(ratios, 0.25),
            "q75": quantile(ratios, 0.75),
            "target": target,
            "pass": med <= target,
            "conclusive": hi <= target or lo > target,
        }
    return out


# ---- part 2: weak_sigreg alone; peak memory in a fresh subprocess per case -------------


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def weak_inputs(c: int, k: int, n: int, device: torch.device, seed: int):
    """z (n, c) requiring grad, and a (c, k) sketch, or None for k = 0 (full covariance)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(n, c, generator=g).to(device).requires_grad_()
    return z, sigreg.draw_sketch(c, k, g).to(device) if k else None


def weak_step(z: torch.Tensor, sketch: torch.Tensor | None) -> None:
    z.grad = None
    sigreg.weak_sigreg(z, sketch).backward()


def peak_mib_child(c: int, k: int, n: int, device: torch.device, seed: int) -> float:
    """Runs in a fresh child process: extra peak memory of the first forward+backward."""
    z, sketch = weak_inputs(c, k, n, device, seed)
    # Start thread pools and BLAS on a tiny problem so their buffers are not counted.
    weak_step(*weak_inputs(16, 4, 8, device, seed))
    weak_step(*weak_inputs(16, 0, 8, device, seed))
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        weak_step(z, sketch)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one (Linux >= 4.0)
    before = _proc_status_kib("VmRSS")
    weak_step(z, sketch)
    return (_proc_status_kib("VmHWM") - before) / 1024


def bench_memory(args, device) -> list[dict]:
    # Pinned mmap threshold: every tensor over 64 KiB gets fresh pages and gives them back
    # when freed, so the resident set follows the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for c in (int(v) for v in args.mem_channels.split(",")):
        for k in (args.sketch_dim, 0):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--mem-case",
                f"{c},{k}",
                "--mem-batch",
                str(args.mem_batch),
                "--device",
                str(device),
                "--seed",
                str(args.seed),
                "--threads",
                str(torch.get_num_threads()),
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory case C={c} K={k} failed:\n{done.stderr}")
            peak = float(done.stdout.split()[-1])
            # Time in this process, after one warm-up call.
            z, sketch = weak_inputs(c, k, args.mem_batch, device, args.seed)
            weak_step(z, sketch)
            ms = [1e3 * timed(weak_step, device, z, sketch) for _ in range(args.mem_repeats)]
            rows.append(
                {
                    "C": c,
                    "K": k or None,
                    "N": args.mem_batch,
                    "median_ms": statistics.median(ms),
                    "peak_mib": peak,
                }
            )
    return rows


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "peak MiB = torch.cuda.max_memory_allocated during one fwd+bwd, above the "
            "inputs, in a fresh process"
        )
    return (
        "peak MiB = rise of the peak resident set (VmHWM, reset first) over the resident "
        "set\n   before one fwd+bwd, in a fresh process, glibc mmap threshold 64 KiB; "
        "includes z.grad"
    )


# ---- output ---------------------------------------------------------------------------


def print_report(res: dict) -> None:
    cfg, env = res["config"], res["env"]
    print(f"$ {res['command']}")
    print(
        f"torch {env['torch']}, device {env['device']}, {env['threads']} threads, "
        f"{env['platform']}; total {res['elapsed_s']:.0f} s"
    )
    st = res["step_time"]
    amp = ", bf16 autocast" if cfg["amp"] else ""
    print("\n1. Training step = zero_grad, forward, cross-entropy, backward, AdamW step")
    print(
        f"   ViT depth {cfg['depth']}, dim {cfg['dim']}, {HEADS} heads, MLP {2 * cfg['dim']}, "
        f"input {cfg['batch']}x{cfg['tokens']}x{cfg['dim']}{amp}; SIGReg on all "
        f"{cfg['depth']} blocks,"
    )
    print(
        f"   token-mean pooling, K={cfg['sketch_dim']} (strong: 17 points). "
        f"{cfg['steps']} rounds after {cfg['warmup']} warm-up rounds."
    )
    print("   Each round runs the three arms and the weak / strong hooks alone back to back,")
    print("   in a random order.")
    print(f"\n   {'arm':<8}{'median ms':>11}{'IQR ms':>20}{'hooks alone ms':>16}")
    for name, a in st["arms"].items():
        iqr = f"{a['q25_ms']:.1f} - {a['q75_ms']:.1f}"
        alone = f"{a['hooks_alone_ms']:.1f}" if name != "none" else "-"
        print(f"   {name:<8}{a['median_ms']:>11.1f}{iqr:>20}{alone:>16}")
    print(
        f"\n   {'ratio':<13}{'median':>8}{'95% CI (bootstrap)':>21}{'IQR':>17}"
        f"{'target':>8}  verdict"
    )
    for name, r in st["ratios"].items():
        verdict = "PASS" if r["pass"] else "FAIL"
        if not r["conclusive"]:
            verdict += " (CI spans the target)"
        ci = f"{r['ci95_low']:.3f} - {r['ci95_high']:.3f}"
        iqr = f"{r['q25']:.3f} - {r['q75']:.3f}"
        print(
            f"   {name + '/none':<13}{r['median']:>8.3f}{ci:>21}{iqr:>17}"
            f"{r['target']:>8.2f}  {verdict}"
        )
    print("   ratio = median over rounds of (arm time / none time in the same round).")
    print(
        "   hooks alone = pooling + the batched regularizer + backward, all blocks, outside the model."
    )

    print(
        f"\n2. weak_sigreg(z, sketch) forward+backward alone, z ({cfg['mem_batch']}, C) "
        f"float32, median of {cfg['mem_repeats']}"
    )
    print(f"\n   {'C':>6}  {'sketch':<8}{'median ms':>11}{'peak MiB':>10}")
    for row in res["weak_memory"]:
        sk = f"K={row['K']}" if row["K"] else "full CxC"
        print(f"   {row['C']:>6}  {sk:<8}{row['median_ms']:>11.2f}{row['peak_mib']:>10.1f}")
    print(f"   {res['memory_measure']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Measure the cost of SIGReg: step-time overhead (none / weak / strong) "
        "on a ViT-sized model, and weak-SIGReg time and memory with a sketch vs the full "
        "covariance.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (smoke test)")
    add_size_arguments(p, SIZES)
    p.add_argument("--sketch-dim", type=int, default=64, help="K for weak and strong")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the model forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--mem-case", help=argparse.SUPPRESS)  # internal: one part-2 case
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
    if args.mem_case:
        c, k = (int(v) for v in args.mem_case.split(","))
        print(peak_mib_child(c, k, args.mem_batch, device, args.seed))
        return

    start = time.perf_counter()
    res = {
        "command": command_line(),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "mem_case")},
        "env": environment(device),
        "step_time": bench_step_time(args, device),
        "weak_memory": bench_memory(args, device),
        "memory_measure": memory_note(device),
    }
    res["elapsed_s"] = time.perf_counter() - start
    print_report(res)
    write_json(args.json, res)


if __name__ == "__main__":
    main()
