"""Cost of each regularizer at the studies' scale: weak, strong, VICReg-style vs none.
Also the cost of the trainer's live collapse monitor on the same model.

The cost side of docs/studies.md: one training step (forward, cross-entropy, regularizer on
every layer the trainer regularizes, backward, SGD step) of a preset's model on a random
batch, for the arms none / weak / strong / vicreg with the preset's settings (alpha, K,
quadrature). The arms are deep copies of one initialisation; every round runs each arm once
in a random order, and the cost is the median over rounds of the per-round ratio arm/none,
with a bootstrap 95% CI (robust to the machine's load drifting during the run).

    .venv/bin/python benchmarks/regularizer_cost.py                  # ~1 minute on 2 CPU cores
    .venv/bin/python benchmarks/regularizer_cost.py --quick --json /tmp/cost.json
    .venv/bin/python benchmarks/regularizer_cost.py --breakdown     # where each arm's extra goes

``--breakdown`` also profiles a block of steps of every arm under ``torch.profiler`` and prints
the aten ops whose self time per step differs most from the arm without regularizer.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from _timing import (
    bootstrap_ci,
    command_line,
    environment,
    interleaved,
    pick_device,
    timed,
    write_json,
)

import sigreg
from sigreg.train.models import build_model
from sigreg.train.monitor import CollapseMonitor
from sigreg.train.presets import preset_config

ARMS = ("none", "weak", "strong", "vicreg")


def make_arms(preset: str, image_shape: tuple[int, int, int], device: torch.device, seed: int,
              compile: bool = False, sketch_policy: str | None = None):
    """arm -> (model, handle or None, optimizer), regularized as the trainer would; with
    ``compile``, model and regularizer compiled (the trainer's compile=true); ``sketch_policy``
    overrides the preset's."""
    cfg = preset_config(preset)
    sketch_policy = sketch_policy or cfg.sketch_policy
    channels, size, _ = image_shape
    torch.manual_seed(seed)
    base = build_model(cfg.model, num_classes=10, image_size=size, in_channels=channels,
                       **cfg.model_args).to(device)
    variant_kwargs = {"strong": {"t_max": cfg.t_max, "num_points": cfg.num_points},
                      "vicreg": {"var_weight": cfg.vicreg_var_weight,
                                 "cov_weight": cfg.vicreg_cov_weight}}
    arms = {}
    for arm in ARMS:
        model = copy.deepcopy(base)
        handle = None
        if arm != "none":
            handle = sigreg.attach(model, model.sigreg_layers, arm, cfg.sketch_dim,
                                   model.sigreg_pool, alpha=cfg.alpha, compile=compile,
                                   sketch_policy=sketch_policy,
                                   **variant_kwargs.get(arm, {}))
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        arms[arm] = (torch.compile(model) if compile else model, handle, opt)
    return cfg, arms


def train_step(arm, x: torch.Tensor, y: torch.Tensor) -> None:
    model, handle, opt = arm
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if handle is not None:
        loss = handle.combine(loss)
    loss.backward()
    opt.step()


def time_monitor(model, x: torch.Tensor, cfg, args: argparse.Namespace,
                 device: torch.device) -> float:
    """Seconds of one collapse-monitor measurement (effective dimension of every layer) on
    the features of a training batch, median over rounds; the forward it reads is free."""
    monitor = CollapseMonitor(model, model.sigreg_layers, model.sigreg_pool, every=1,
                              threshold=0.0, warn=lambda _: None)
    with monitor.recording(0):
        model(x)
    times = [timed(monitor.measure, device, 0, 1) for _ in range(args.warmup + args.rounds)]
    monitor.recorder.remove()
    return statistics.median(times[args.warmup:])


def breakdown(arms: dict, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, dict]:
    """Self time per step of every profiled op (microseconds), for each arm, from one block of
    ``steps`` steps under ``torch.profiler`` (CPU activity: on a GPU, the launches)."""
    from torch.profiler import ProfilerActivity, profile

    per_arm = {}
    for name in ARMS:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                train_step(arms[name], x, y)
        per_arm[name] = {e.key: e.self_cpu_time_total / steps for e in prof.key_averages()}
    return per_arm


def print_breakdown(per_arm: dict[str, dict], rows: int = 12) -> None:
    none = per_arm["none"]
    for arm in ARMS[1:]:
        ops = per_arm[arm]
        diff = {k: ops.get(k, 0.0) - none.get(k, 0.0) for k in set(ops) | set(none)}
        print(f"\n{arm}: self time {sum(ops.values()):.0f} us/step against none "
              f"{sum(none.values()):.0f} (profiled); the ops that differ most, us/step:")
        for key, delta in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:rows]:
            print(f"   {delta:+8.1f}  {key[:70]}")


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    shape = (1, 28, 28)
    cfg, arms = make_arms(args.preset, shape, device, args.seed, args.compile,
                          args.sketch_policy)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    # A block of steps per timing: one MLP step is too short to time alone on a GPU.
    times = interleaved(ARMS, args.rounds, args.warmup, args.seed, lambda arm: timed(
        lambda: [train_step(arms[arm], x, y) for _ in range(args.steps)], device) / args.steps)
    if args.breakdown:
        out_breakdown = breakdown(arms, x, y, 10 * args.steps)
    plain = arms["none"][0]
    monitor_s = time_monitor(getattr(plain, "_orig_mod", plain), x, cfg, args, device)
    out = {"preset": args.preset, "model": cfg.model, "model_args": cfg.model_args,
           "alpha": cfg.alpha, "sketch_dim": cfg.sketch_dim,
           "sketch_policy": args.sketch_policy or cfg.sketch_policy, "arms": {}, "ratios": {}}
    if args.breakdown:
        out["breakdown_us_per_step"] = out_breakdown
    none_s = statistics.median(times["none"])
    out["monitor"] = {"ms_per_measurement": 1e3 * monitor_s, "every": cfg.monitor_every,
                      "share_of_none_step": monitor_s / (cfg.monitor_every * none_s)
                      if cfg.monitor_every else 0.0}
    for arm in ARMS:
        out["arms"][arm] = {"median_ms": 1e3 * statistics.median(times[arm]),
                            "times_ms": [1e3 * t for t in times[arm]]}
        if arm != "none":
            ratios = [a / b for a, b in zip(times[arm], times["none"], strict=True)]
            lo, hi = bootstrap_ci(ratios, seed=args.seed)
            out["ratios"][arm] = {"median": statistics.median(ratios), "ci95_low": lo,
                                  "ci95_high": hi}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="fmnist-mlp-weak",
                   help="preset whose model and SIGReg settings are used (its sigreg is ignored)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sketch-policy", "--sketch", choices=("resample", "fixed"),
                   help="sketch_policy of weak and strong (default: the preset's); --sketch is "
                        "its former name")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every arm's model and regularizer (warm-up compiles)")
    p.add_argument("--breakdown", action="store_true",
                   help="also profile every arm: the aten ops whose time differs from none")
    p.add_argument("--quick", action="store_true", help="a few seconds (smoke test)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.rounds, args.warmup = 16, 1, 3, 1
    for name in ("batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    env = environment(device)
    print(command_line())
    print(f"device {env['device']}, torch {env['torch']}, {env['threads']} threads, "
          f"{env['platform']}")
    start = time.perf_counter()
    res = measure(args, device)
    res.update(command=command_line(), env=env, config=vars(args),
               elapsed_s=time.perf_counter() - start)
    print(f"{args.preset}: model {res['model']} {res['model_args']}, batch {args.batch}, "
          f"alpha {res['alpha']}, K {res['sketch_dim']}, sketch_policy {res['sketch_policy']}; "
          f"{args.rounds} rounds of "
          f"{args.steps} steps per arm" + (", model and regularizer compiled" if args.compile else ""))
    print(f"\n   {'arm':<8}{'ms/step':>9}{'ratio to none':>15}{'95% CI':>17}")
    for arm in ARMS:
        a, r = res["arms"][arm], res["ratios"].get(arm)
        cost = f"{r['median']:.2f}x" if r else "-"
        ci = f"{r['ci95_low']:.2f} - {r['ci95_high']:.2f}" if r else ""
        print(f"   {arm:<8}{a['median_ms']:>9.2f}{cost:>15}{ci:>17}")
    if args.breakdown:
        print_breakdown(res["breakdown_us_per_step"])
    mon = res["monitor"]
    print(f"\ncollapse monitor: {mon['ms_per_measurement']:.2f} ms per measurement of all "
          f"layers; every {mon['every']} steps that is {100 * mon['share_of_none_step']:.1f} % "
          "of the unregularized training time")
    print(f"\n{res['elapsed_s']:.0f} s")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
