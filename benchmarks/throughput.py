"""Training throughput: our on-device batch augmentation vs a DataLoader with workers.

Both arms train the same ``paper-vit`` (one model and one AdamW, shared) on the same synthetic
CIFAR-shaped data (3x32x32, 100 classes) with the paper's recipe: crop 4 + flip,
RandAugment(2, 9), MixUp 0.8 / CutMix 1.0, normalise.

* ours: the whole uint8 training set lives on the device; each step indexes a batch from a
  random permutation and runs ``BatchAugmenter`` on it (vectorised over the batch).
* dataloader: a ``Dataset`` whose ``__getitem__`` runs ``augment_single_image`` (crop, flip,
  RandAugment, normalise: the same ops on one image), ``DataLoader(num_workers=--workers,
  persistent_workers=True, pin_memory on CUDA)``; MixUp/CutMix is a batch-level step, so the
  main process applies it to the collated float batch with ``BatchAugmenter._mix``, the very
  code the ours arm runs (it is private; there is no public mixing-only entry point).

Measurement: warm-up, then R rounds; each round runs one block of each arm (order alternating
ABBA-style between rounds, against drift). A block is ``--steps`` batches and, for the
DataLoader, one pass of its iterator: its sampler draws what ``shuffle=True`` draws (random
permutations) but ``--steps`` x ``--batch`` indices per pass, so no prefetched work outlives
its block and runs during the other arm's block; each such block pays the pipeline fill
latency once, as every real epoch does (the ours arm draws its indices the same way). Reported: median images/s per arm and the median
of the per-round ratios ours/dataloader with their min..max, for full training steps and for
the augmentation alone (no model). PASS means the training-step median ratio is >= 1.5.

    .venv/bin/python benchmarks/throughput.py                  # ~2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/throughput.py --quick --json /tmp/throughput.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _timing import command_line, environment, pick_device, sync, write_json
from torch.utils.data import DataLoader, Dataset, Sampler

from sigreg.train.augment import AugmentConfig, Batch, BatchAugmenter, augment_single_image
from sigreg.train.data import make_synthetic
from sigreg.train.models import build_model

TARGET = 1.5
PAPER_RECIPE = AugmentConfig(crop_padding=4, flip=True, randaugment_ops=2,
                             randaugment_magnitude=9, mixup_alpha=0.8, cutmix_alpha=1.0)
# Settings that --quick changes: (full, quick).
SIZES = {
    "train_size": (5120, 256),
    "batch": (128, 32),
    "steps": (4, 2),
    "aug_steps": (10, 2),
    "rounds": (5, 2),
    "warmup": (2, 1),
    "dim": (256, 32),
    "depth": (6, 1),
}


def random_indices(n: int, size: int) -> torch.Tensor:
    """``size`` indices into ``range(n)``: successive random permutations, concatenated."""
    return torch.cat([torch.randperm(n) for _ in range(-(-size // n))])[:size]


class BlockSampler(Sampler[int]):
    """What ``shuffle=True`` samples, but ``size`` indices per pass, so a pass is one block."""

    def __init__(self, n: int) -> None:
        self.n = self.size = n

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(random_indices(self.n, self.size).tolist())


class PerSampleAugmented(Dataset):
    """uint8 images augmented one at a time, as a DataLoader worker would do it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self._generator: torch.Generator | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pid != os.getpid():  # a fresh process: seed from its (per-worker) torch seed
            self._generator = torch.Generator().manual_seed(torch.initial_seed())
            self._pid = os.getpid()
        img = augment_single_image(self.images[i], PAPER_RECIPE, self.mean, self.std,
                                   self._generator)
        return img, self.labels[i]


class Arms:
    """The two ways of producing a training batch, sharing one model and optimizer."""

    def __init__(self, args, device: torch.device) -> None:
        data = make_synthetic(args.train_size, 1, 32, 3, 100, args.seed)
        self.device, self.batch = device, args.batch
        self.images = data.train_images.to(device)
        self.labels = data.train_labels.to(device)
        self.augmenter = BatchAugmenter(PAPER_RECIPE, data.mean, data.std, seed=args.seed)
        self.mixer = BatchAugmenter(PAPER_RECIPE, data.mean, data.std, seed=args.seed + 1)
        dataset = PerSampleAugmented(data.train_images, data.train_labels, data.mean, data.std)
        self.sampler = BlockSampler(len(dataset))
        self.loader = DataLoader(dataset, batch_size=args.batch, sampler=self.sampler,
                                 num_workers=args.workers, persistent_workers=args.workers > 0,
                                 pin_memory=device.type == "cuda")
        torch.manual_seed(args.seed)
        self.model = build_model("paper-vit", num_classes=100, image_size=32, in_channels=3,
                                 dim=args.dim, depth=args.depth).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def train_step(self, batch: Batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        batch.loss(self.model(batch.images)).backward()
        self.optimizer.step()

    def ours(self, steps: int, train: bool) -> None:
        order = random_indices(len(self.images), steps * self.batch).to(self.device)
        for idx in order.split(self.batch):
            batch = self.augmenter(self.images[idx], self.labels[idx])
            if train:
                self.train_step(batch)

    def dataloader(self, steps: int, train: bool) -> None:
        self.sampler.size = steps * self.batch  # one pass of the loader = one block
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            batch = self.mixer._mix(x, y)  # the batch-level MixUp/CutMix of the ours arm
            if train:
                self.train_step(batch)

    def images_per_s(self, arm: str, steps: int, train: bool) -> float:
        sync(self.device)
        start = time.perf_counter()
        getattr(self, arm)(steps, train)
        sync(self.device)
        return steps * self.batch / (time.perf_counter() - start)


def compare(arms: Arms, steps: int, rounds: int, train: bool) -> dict:
    """Interleaved blocks of both arms: images/s per round, medians and ratio spread."""
    rates: dict[str, list[float]] = {"ours": [], "dataloader": []}
    for r in range(rounds):
        for arm in ("ours", "dataloader") if r % 2 == 0 else ("dataloader", "ours"):
            rates[arm].append(arms.images_per_s(arm, steps, train))
    ratios = [a / b for a, b in zip(rates["ours"], rates["dataloader"])]
    res = {arm: {"median_img_s": statistics.median(v), "per_round_img_s": v}
           for arm, v in rates.items()}
    res["ratio"] = {"median": statistics.median(ratios), "min": min(ratios),
                    "max": max(ratios), "per_round": ratios}
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Training images/s with on-device batch augmentation (ours) vs a "
        "DataLoader whose workers augment per sample; same recipe, model and run.",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="default auto: cuda if available")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (smoke test)")
    help_for = {"steps": "batches per timed block (training)",
                "aug_steps": "batches per timed block (augmentation only)",
                "rounds": "rounds of one block per arm", "warmup": "untimed batches per arm",
                "dim": "paper-vit width", "depth": "paper-vit blocks",
                "train_size": "synthetic training images", "batch": "batch size"}
    for name, (full, quick) in SIZES.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{help_for[name]}; default {full}, with --quick {quick}")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0: torch's)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.steps, args.aug_steps, args.rounds, args.batch, args.train_size) < 1:
        p.error("--steps, --aug-steps, --rounds, --batch and --train-size must be >= 1")
    if args.warmup < 0 or args.workers < 0:
        p.error("--warmup and --workers must be >= 0")
    return args


def print_report(res: dict) -> None:
    env, cfg = res["env"], res["config"]
    print(f"device {env['device']}, torch {env['torch']}, {env['threads']} threads, "
          f"{env['platform']}; DataLoader workers {cfg['workers']}")
    print(f"paper-vit dim {cfg['dim']} depth {cfg['depth']}, batch {cfg['batch']}, "
          f"{cfg['train_size']} images; {cfg['rounds']} rounds, medians over rounds\n")
    print(f"{'phase':<14}{'block':>7}  {'ours img/s':>11}{'dataloader img/s':>18}"
          f"{'ours/dataloader':>17}  per-round min..max")
    for phase, steps in (("train step", cfg["steps"]), ("augment only", cfg["aug_steps"])):
        r = res[phase.replace(" ", "_")]
        print(f"{phase:<14}{steps:>7}  {r['ours']['median_img_s']:>11.0f}"
              f"{r['dataloader']['median_img_s']:>18.0f}{r['ratio']['median']:>16.2f}x"
              f"  {r['ratio']['min']:.2f}..{r['ratio']['max']:.2f}")
    verdict = "PASS" if res["pass"] else "FAIL"
    print(f"\n{verdict}: training images/s ratio ours/dataloader "
          f"{res['train_step']['ratio']['median']:.2f}x (target >= {TARGET}x); "
          f"{res['elapsed_s']:.0f} s")


def main(argv=None) -> None:
    args = parse_args(argv)
    print(command_line(), flush=True)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    arms = Arms(args, device)
    if args.warmup:
        for arm in ("ours", "dataloader"):  # also starts the persistent workers
            arms.images_per_s(arm, args.warmup, train=True)
    res = {
        "command": command_line(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "env": environment(device),
        "train_step": compare(arms, args.steps, args.rounds, train=True),
        "augment_only": compare(arms, args.aug_steps, args.rounds, train=False),
        "target": TARGET,
    }
    res["pass"] = res["train_step"]["ratio"]["median"] >= TARGET
    res["elapsed_s"] = time.perf_counter() - start
    print_report(res)
    write_json(args.json, res)


if __name__ == "__main__":
    main()
