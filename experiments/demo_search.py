"""Search CPU-scale Fashion-MNIST settings where SIGReg changes the outcome (issue: make demo).

Each setting is a set of TrainConfig overrides; every setting runs as baseline / weak / strong
for several seeds, in a pool of worker processes. One JSON line per finished run (with the
run's provenance) is appended to ``--out``; runs already there are skipped, so an interrupted
search resumes. ``--tables FILE`` prints, per setting, the final test accuracy of every arm
(mean ± std) and weak and strong minus none paired over seeds with their 95 % interval.

    python experiments/demo_search.py --grid mlp --seeds 0 1 2 --workers 2 --out runs/search.jsonl
    python experiments/demo_search.py --tables experiments/search-gpu-h100.jsonl
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from _tables import PAIRED_NOTE, by_seed, cell, grid_table, paired_table, read_jsonl

from sigreg.train.config import TrainConfig, apply_overrides
from sigreg.train.trainer import train

FMNIST = ["dataset=fashion-mnist", "batch_size=128", "monitor_every=0"]
MLP = FMNIST + ["model=mlp", "optimizer=sgd", "lr=0.1", "weight_decay=0", "grad_clip=1",
                "schedule=constant", "crop_padding=2"]
VIT = FMNIST + ["model=paper-vit", "model.patch_size=4", "optimizer=adamw", "lr=1e-3",
                "weight_decay=5e-4", "crop_padding=2", "mixup_alpha=0.8", "cutmix_alpha=1.0"]

GRIDS: dict[str, dict[str, list[str]]] = {
    "mlp": {
        f"mlp-d{d}-w{w}-e{e}": MLP + [f"model.depth={d}", f"model.width={w}", f"epochs={e}"]
        for d in (6, 10, 14, 20) for w in (256,) for e in (5,)
    },
    "vit": {
        "vit-d128x6-lr1e-3-mix": VIT + ["model.dim=128", "model.depth=6", "model.heads=4",
                                        "num_train=10000", "epochs=10"],
        "vit-d128x6-lr1e-3-mix-ra": VIT + ["model.dim=128", "model.depth=6", "model.heads=4",
                                           "num_train=10000", "epochs=10", "randaugment_ops=2"],
        "vit-d128x6-lr3e-3-mix-ra": VIT + ["model.dim=128", "model.depth=6", "model.heads=4",
                                           "num_train=10000", "epochs=10", "randaugment_ops=2",
                                           "lr=3e-3"],
        "vit-d128x12-lr1e-3-mix-ra": VIT + ["model.dim=128", "model.depth=12", "model.heads=4",
                                            "num_train=10000", "epochs=10", "randaugment_ops=2"],
        "vit-d64x6-p7-lr1e-3-mix-ra": VIT + ["model.dim=64", "model.depth=6", "model.heads=4",
                                             "model.patch_size=7", "num_train=10000",
                                             "epochs=10", "randaugment_ops=2"],
    },
}
ARMS = {"none": ["sigreg=none"], "weak": ["sigreg=weak"], "strong": ["sigreg=strong"]}


def run_one(job: tuple[str, list[str], str, int]) -> dict:
    setting, overrides, arm, seed = job
    cfg = apply_overrides(TrainConfig(), overrides + ARMS[arm] + [f"seed={seed}"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(cfg, tmp, progress=False, log=lambda _: None)
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    accs = [r["test_acc"] for r in rows if r["kind"] == "epoch"]
    return {"setting": setting, "arm": arm, "seed": seed, "overrides": overrides,
            "final": summary["final_test_acc"], "best": summary["best_test_acc"], "accs": accs,
            "seconds": time.perf_counter() - t0, "provenance": summary.get("provenance", [])}


def tables(results: list[dict]) -> str:
    """Per setting (in the file's order): mean ± std of the final test accuracy (%) of every
    arm, then every arm minus none (points), paired over seeds."""
    settings = list(dict.fromkeys(r["setting"] for r in results))
    acc = lambda setting, arm: by_seed(results, lambda r: 100 * r["final"], setting=setting,
                                       arm=arm)
    means = grid_table("setting", settings, list(ARMS),
                       lambda setting, arm: cell(list(acc(setting, arm).values()), digits=1))
    return f"{means}\n{PAIRED_NOTE}\n\n{paired_table('setting', settings, list(ARMS), 'none', acc)}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), nargs="+")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    p.add_argument("--out", type=Path)
    p.add_argument("--tables", type=Path, metavar="RESULTS",
                   help="print the tables of a results file and train nothing")
    args = p.parse_args(argv)
    if args.tables:
        print(tables(read_jsonl(args.tables)))
        return
    if not args.grid or args.out is None:
        p.error("--grid and --out are needed to search (or --tables RESULTS to read one)")
    done = set()
    if args.out.exists():
        done = {(r["setting"], r["arm"], r["seed"]) for r in map(json.loads, args.out.read_text().splitlines())}
    jobs = [(name, ov + args.set, arm, seed) for g in args.grid for name, ov in GRIDS[g].items()
            for seed in args.seeds for arm in args.arms if (name, arm, seed) not in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for result in pool.imap_unordered(run_one, jobs):
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{result['setting']:32s} {result['arm']:6s} seed {result['seed']}  "
                  f"final {result['final']:.4f}  best {result['best']:.4f}  {result['seconds']:.0f}s",
                  flush=True)


if __name__ == "__main__":
    main()
