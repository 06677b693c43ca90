"""A small byte-level transformer language model on Debian's ``fortunes``
(about 2.5 MB of English text, ``apt-get install fortunes``), with no regularizer, weak or
strong SIGReg on every block's output (``pool="flatten"``: every token a sample, the paper's
nanoGPT setting, alpha 0.01), at learning rates from where the baseline trains to where it
does not. Does SIGReg change validation loss or stability?

The corpus is every fortune file, split into fortunes at the ``%`` lines, shuffled with a
fixed seed, 90 % for training and 10 % for validation, and kept as bytes on the device. The
model: byte embedding + learned positions, ``--depth`` pre-LayerNorm blocks
(``nn.TransformerEncoderLayer`` with a causal mask), a final LayerNorm and a linear head; AdamW
(betas 0.9 / 0.95, weight decay 0.1) at a constant learning rate, no warm-up, no clipping. A run
whose loss turns non-finite is recorded as diverged (validation loss = that of a uniform guess,
8 bits a byte).

Every (seed, lr, arm) appends one line to ``<out>/results.jsonl`` when it finishes (with the
provenance of the process that trained it); a rerun skips the lines already there. Then
``char_lm.md`` (final validation loss in bits per byte, mean ± std over seeds, and each arm
minus ``--baseline`` paired over seeds with its 95 % interval: negative is better) and
``char_lm.png`` (validation loss against step, one panel per lr). ``--tables FILE`` prints the
tables of a results file (the committed raw file) with no corpus and no training.

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 experiments/char_lm.py --out runs/char-lm
    PYTHONPATH=src python3 experiments/char_lm.py --out /tmp/lm --steps 20 --eval-every 10 \\
        --lrs 1e-3 --seeds 1      # smoke test
    PYTHONPATH=src python3 experiments/char_lm.py --tables experiments/char-lm-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _tables import PAIRED_NOTE, by_seed, cell, grid_table, paired_table, read_jsonl
from torch import nn

import sigreg
from sigreg.auto import AutoWeight
from sigreg.train.provenance import provenance

# "weak-scale-invariant": weak with scale_invariant=True (docs/studies.md, section 14).
ARMS = ("none", "weak", "strong", "weak-scale-invariant")
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
CORPUS = Path("/usr/share/games/fortunes")
UNIFORM_BITS = 8.0  # a uniform guess over 256 byte values


def load_corpus(directory: Path, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte tensors from the fortune files in ``directory``."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.suffix)
    if not files:
        raise ValueError(f"no fortune files in {directory}: install Debian's `fortunes` "
                         "(apt-get install fortunes) or pass --corpus")
    fortunes = [f.strip() for p in files
                for f in p.read_text(encoding="utf-8", errors="replace").split("\n%\n") if f.strip()]
    random.Random(seed).shuffle(fortunes)
    cut = int(0.9 * len(fortunes))
    encode = lambda texts: torch.tensor(list("\n\n".join(texts).encode()), dtype=torch.long)
    return encode(fortunes[:cut]), encode(fortunes[cut:])


class CharTransformer(nn.Module):
    """Byte-level causal transformer; ``blocks.i`` are the layers SIGReg regularizes."""

    def __init__(self, dim: int, depth: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.position = nn.Parameter(torch.zeros(context, dim))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.position[:t]
        for block in self.blocks:
            x = block(x, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def batch(data: torch.Tensor, size: int, context: int, gen: torch.Generator) -> tuple:
    starts = torch.randint(0, data.numel() - context - 1, (size,), generator=gen)
    rows = starts.unsqueeze(1) + torch.arange(context + 1)
    chunk = data[rows]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def validation_bits(model: nn.Module, val: torch.Tensor, args: argparse.Namespace) -> float:
    """Mean cross-entropy in bits per byte on ``--eval-batches`` fixed validation batches."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
              for x, y in (batch(val, args.batch, args.context, gen)
                           for _ in range(args.eval_batches))]
    model.train()
    return statistics.fmean(losses) / math.log(2)


def train_run(arm: str, lr: float, seed: int, train: torch.Tensor, val: torch.Tensor,
              args: argparse.Namespace) -> dict[str, Any]:
    record = provenance("cpu")  # taken at the start, like a run directory's
    torch.manual_seed(seed)
    model = CharTransformer(args.dim, args.depth, args.heads, args.context)
    variant, _, form = arm.partition("-")
    handle = None if arm == "none" else sigreg.attach(
        model, "blocks.*", variant, args.sketch_dim, pool="flatten", seed=seed,
        alpha=AutoWeight(base=args.auto_base) if args.alpha == "auto" else args.alpha,
        **({"scale_invariant": True} if form else {}))
    alphas = []  # alpha="auto": the weight of every step
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    curve, train_loss, start = [], [], time.perf_counter()
    diverged_at = None
    for step in range(1, args.steps + 1):
        x, y = batch(train, args.batch, args.context, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        task = loss.item()
        if handle is not None:
            loss = handle.combine(loss)
            if handle.auto is not None:
                alphas.append(float(handle.weight))
        if not math.isfinite(loss.item()):
            diverged_at = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_loss.append(task / math.log(2))
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, validation_bits(model, val, args)))
    if handle is not None:
        handle.remove()
    final = UNIFORM_BITS if diverged_at else curve[-1][1]
    return {"arm": arm, "lr": lr, "seed": seed, "alpha": None if handle is None else args.alpha,
            "sketch_dim": args.sketch_dim, "steps": args.steps, "final_val_bits": final,
            "best_val_bits": min([b for _, b in curve], default=UNIFORM_BITS),
            "diverged_at": diverged_at, "val_curve": curve,
            "train_bits_last100": statistics.fmean(train_loss[-100:]) if train_loss else None,
            "seconds": time.perf_counter() - start, "provenance": [record],
            **({"auto_base": args.auto_base, "alpha_steps": alphas}
               if handle is not None and args.alpha == "auto" else {})}


def bits(results: list[dict[str, Any]], lr: float, arm: str) -> dict[int, float]:
    """``{seed: final validation bits per byte}`` of a cell (a diverged run at 8 bits)."""
    return by_seed(results, lambda r: r["final_val_bits"], lr=lr, arm=arm)


def markdown(results: list[dict[str, Any]], lrs: list[float], arms: list[str],
             baseline: str = "none") -> str:
    """Rows lr, columns arm: mean ± std of the final validation bits per byte; then every arm
    minus ``baseline`` (bits; negative is better), paired over seeds."""
    def cell_of(lr: float, arm: str) -> str:
        rows = [r for r in results if r["lr"] == lr and r["arm"] == arm]
        diverged = sum(r["diverged_at"] is not None for r in rows)
        return cell(list(bits(results, lr, arm).values()), digits=3) + (
            f", {diverged} diverged" if diverged else "")

    label = lambda lr: f"{lr:g}"
    means = grid_table("lr", lrs, arms, cell_of, label)
    paired = paired_table("lr", lrs, arms, baseline, lambda lr, arm: bits(results, lr, arm),
                          label, digits=3)
    return f"{means}\n{PAIRED_NOTE}\n\n{paired}"


def plot(results: list[dict[str, Any]], lrs: list[float], arms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lrs), figsize=(3.2 * len(lrs), 3.2), sharey=True,
                             squeeze=False)
    colors = dict(zip(ARMS, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    labelled = set()
    for ax, lr in zip(axes[0], lrs, strict=True):
        for r in results:
            if r["lr"] == lr and r["arm"] in arms and r["val_curve"]:
                steps, bits = zip(*r["val_curve"], strict=True)
                ax.plot(steps, bits, color=colors[r["arm"]], alpha=0.8,
                        label=None if r["arm"] in labelled else r["arm"])
                labelled.add(r["arm"])
        ax.set_title(f"lr {lr:g}", fontsize=9)
        ax.set_xlabel("step")
    lowest = min((b for r in results for _, b in r["val_curve"]), default=0.0)
    axes[0][0].set_ylim(max(lowest - 0.2, 0.0), UNIFORM_BITS)  # shared by every panel
    axes[0][0].set_ylabel("validation bits / byte")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _alpha(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/char-lm"))
    p.add_argument("--corpus", type=Path, default=CORPUS, help="directory of fortune files")
    p.add_argument("--arms", nargs="+", default=list(ARMS[:3]), choices=ARMS)
    p.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    p.add_argument("--seeds", type=int, default=2, help="how many seeds: --first-seed onwards")
    p.add_argument("--first-seed", type=int, default=0,
                   help="held-out seeds for a setting chosen on seeds 0-2: --first-seed 3")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--sketch-dim", type=int, default=64)
    p.add_argument("--alpha", type=_alpha, default=0.01,
                   help="the paper's LM setting; auto: sigreg.auto's weight")
    p.add_argument("--auto-base", type=float, default=0.1,
                   help="with --alpha auto: the weight's base (AutoWeight(base=...)), in (0, 0.5]")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline", default="none", choices=ARMS,
                   help="the arm the paired differences are taken against")
    p.add_argument("--tables", type=Path, metavar="RESULTS",
                   help="print the tables of a results file (results.jsonl or a committed raw "
                        "file); no corpus, no training")
    args = p.parse_args(argv)
    for name in ("seeds", "steps", "eval_every", "eval_batches", "batch", "context", "dim",
                 "depth", "heads", "sketch_dim", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.first_seed < 0:
        p.error("--first-seed must be at least 0")
    if (args.alpha != "auto" and not 0 < args.alpha < 1) or \
            any(not 0 < lr < math.inf for lr in args.lrs):
        p.error("--alpha must lie in (0, 1) and every --lrs value be > 0")
    if not 0 < args.auto_base <= 0.5:
        p.error(f"--auto-base must lie in (0, 0.5], got {args.auto_base}")
    if args.tables is None and not args.corpus.is_dir():
        p.error(f"--corpus {args.corpus} is not a directory (apt-get install fortunes)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tables:
        print(markdown(read_jsonl(args.tables), args.lrs, args.arms, args.baseline))
        return 0
    results_path = args.out / "results.jsonl"
    results = [json.loads(line) for line in results_path.read_text().splitlines()
               if line.strip()] if results_path.exists() else []
    # A finished run is known by (arm, lr, seed): rows trained with other settings in the same
    # folder would be taken for this call's runs and averaged with them.
    for r in results:
        ran = {"sketch_dim": args.sketch_dim, "steps": args.steps,
               "alpha": None if r["arm"] == "none" else args.alpha,
               **({"auto_base": args.auto_base} if args.alpha == "auto" else {})}
        other = {k: r[k] for k in ran if k in r and r[k] != ran[k]}
        if other:
            print(f"char_lm.py: error: {results_path} holds runs with {other}, not this call's "
                  f"settings; give another --out", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    train, val = load_corpus(args.corpus)
    print(f"corpus: {train.numel()} training bytes, {val.numel()} validation bytes", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    done = {(r["arm"], r["lr"], r["seed"]) for r in results}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs = [(a, lr, s) for s in seeds for lr in args.lrs for a in args.arms]
    for i, (arm, lr, seed) in enumerate(runs, 1):
        if (arm, lr, seed) in done:
            continue
        result = train_run(arm, lr, seed, train, val, args)
        results.append(result)
        with results_path.open("a") as f:  # one line per finished run: a rerun skips it
            f.write(json.dumps(result) + "\n")
        print(f"[{i}/{len(runs)}] {arm} lr {lr:g} seed {seed}: validation "
              f"{result['final_val_bits']:.3f} bits/byte"
              + (f", diverged at step {result['diverged_at']}" if result["diverged_at"] else "")
              + f" ({result['seconds']:.0f} s)", flush=True)
    table = markdown(results, args.lrs, args.arms, args.baseline)
    (args.out / "char_lm.md").write_text(table)
    plot(results, args.lrs, args.arms, args.out / "char_lm.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
