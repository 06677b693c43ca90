"""The GPU evidence queue's helper; ``benchmarks/gpu_queue.sh`` runs it (its header says what
the queue is for and how a session calls it). Settings come from the environment that script
exports (OUT, DONE_DIR, SCRATCH, DEVICE, DATA_DIR, EXTRA, EPOCHS, MAX_EPOCHS, MIN_EPOCHS,
VIT_MIN_S, QUEUE_COMMAND).

    python benchmarks/gpu_queue.py pending           # items with no result in DONE_DIR, in order
    python benchmarks/gpu_queue.py check-data        # one line and exit 2 if Fashion-MNIST is missing
    python benchmarks/gpu_queue.py pack-cost DIR     # gpu_cost.sh's files in DIR -> OUT/gpu-cost-<hash>.json
    python benchmarks/gpu_queue.py vit ITEM --left S # ITEM's four arms at once -> OUT/ITEM.jsonl

A ViT item trains the ``fmnist-vit-full-<arm>`` presets (the paper's recipe on all of
Fashion-MNIST) for none / weak / strong / vicreg at one lr and seed, four processes on the one
device, with ``epochs`` set so that the cosine schedule ends with the run. How many epochs:

- the first item (lr 1e-3, seed 0) fills the time left: ``(left - start-up - reserve) /
  epoch time``, at most MAX_EPOCHS. The times are the slowest arm's, measured by earlier queue
  runs when DONE_DIR holds any, else by a calibration in this slot: the four arms for one epoch
  (its start-up, and its training loop's time for an epoch, PLAN_MARGIN added for the test pass
  and the checkpoint it leaves out);
- every later item repeats that item's epoch count, so that seeds and learning rates compare,
  and runs only where its measured time fits in what is left;
- EPOCHS=N sets the count outright.

A run still going at the deadline is stopped (SIGINT: the trainer keeps its last epoch) and
recorded as cut with the epochs it finished. Nothing here estimates a result: accuracies are
the runs' own rows.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("none", "weak", "strong", "vicreg")
# The queue, most valuable first. (b) the paper's lr, seed 0; then (c) a slot at a time: more
# seeds at that lr, then the learning rates either side of it.
VIT_ITEMS = {"vit-full-lr1e-3": (1e-3, 0), "vit-full-lr1e-3-s1": (1e-3, 1),
             "vit-full-lr1e-3-s2": (1e-3, 2), "vit-full-lr3e-4": (3e-4, 0),
             "vit-full-lr3e-3": (3e-3, 0)}
ITEMS = ("gpu-cost", *VIT_ITEMS)
FIRST_VIT = "vit-full-lr1e-3"  # its epoch count is every later ViT item's
# gpu_cost.sh's parts and the files they leave (epochs and compiled share epochs.jsonl).
COST_PARTS = {"cost": "cost.json", "overhead": "overhead_amp.json", "epochs": "epochs.jsonl",
              "compiled": "epochs.jsonl", "cost-compiled": "cost_compiled.json"}
PLAN_MARGIN = 1.1  # on every per-epoch time a plan uses
END_RESERVE_S = 20  # stopping cut runs (up to 15 s) and writing the results
FINAL = ("finished", "diverged", "failed")  # a run in one of these states is not run again
# sigreg.train.data.FASHION_MNIST_FILES, without importing torch for a look at the folder.
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def out_dir() -> Path:
    return Path(env("OUT", "runs/gpu-queue"))


def done_dir() -> Path:
    return Path(env("DONE_DIR", str(ROOT / "experiments" / "gpu-queue")))


# --------------------------------------------------------------------------- what is done


def src_hash() -> str:
    """sha256 of the library's top-level modules (src/sigreg/*.py, names and contents): what
    the cost targets measure. train/ and integrations/ do not change them."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "sigreg").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def result_name(item: str) -> str:
    return f"gpu-cost-{src_hash()[:12]}.json" if item == "gpu-cost" else f"{item}.jsonl"


def read_result(item: str, folders: list[Path]) -> tuple[Path, Any] | None:
    """The first results file of ``item`` in ``folders``, parsed: a dict for gpu-cost, the
    list of run records for a ViT item."""
    for folder in folders:
        path = folder / result_name(item)
        if path.is_file():
            text = path.read_text()
            if item == "gpu-cost":
                return path, json.loads(text)
            return path, [json.loads(line) for line in text.splitlines() if line.strip()]
    return None


def is_done(item: str, result: Any) -> bool:
    """Complete results: every gpu_cost part measured or failed (not one left out for
    time); every ViT run finished, diverged or failed (a cut one is run again)."""
    if item == "gpu-cost":
        return result.get("status") == "complete"
    return len(result) == len(ARMS) and all(r["state"] in FINAL for r in result)


def cmd_pending() -> int:
    for item in ITEMS:
        found = read_result(item, [done_dir()])
        if found and is_done(item, found[1]):
            print(f"== {item}: done ({found[0]})", file=sys.stderr)
        else:
            again = " (its earlier result is incomplete: run again)" if found else ""
            print(f"== {item}: to run{again}", file=sys.stderr)
            print(item)
    return 0


def queue_record(device: str) -> dict[str, Any]:
    """The provenance every results file carries: the command, the library's hash, and
    sigreg / git / torch / device / threads / date as the trainer records them."""
    from sigreg.train.provenance import provenance

    return {"command": env("QUEUE_COMMAND"), "src_hash": src_hash(), **provenance(device)}


# --------------------------------------------------------------------------- data


def find_data() -> Path | None:
    """The folder holding Fashion-MNIST's four files: DATA_DIR or DATA_DIR/fashion-mnist, the
    places ``sigreg.train.data`` looks in when data_dir is set."""
    root = data_root()
    return next((d for d in (root, root / "fashion-mnist")
                 if all((d / f).is_file() for f in FASHION_MNIST_FILES)), None)


def data_root() -> Path:
    root = Path(env("DATA_DIR", ".gpu-data")).expanduser()
    return root if root.is_absolute() else ROOT / root


def cmd_check_data() -> int:
    if find_data() is None:
        print(f"gpu_queue: no Fashion-MNIST in DATA_DIR={data_root()} (nor its fashion-mnist/): "
              "the vit-full items cannot run; copy /usr/share/datasets/fashion-mnist/*.gz into "
              ".gpu-data/fashion-mnist/ and carry .gpu-data (see benchmarks/gpu_queue.sh)")
        return 2
    return 0


def data_record(folder: Path) -> dict[str, Any]:
    """Where the data was, how many images each split holds (the IDX headers), and each
    file's MD5 (Debian's files are recompressed: they differ from the download's)."""
    def count(name: str) -> int:
        with gzip.open(folder / name, "rb") as f:
            return int.from_bytes(f.read(8)[4:], "big")

    return {"dir": str(folder), "train_images": count("train-images-idx3-ubyte.gz"),
            "test_images": count("t10k-images-idx3-ubyte.gz"),
            "md5": {f: hashlib.md5((folder / f).read_bytes()).hexdigest()
                    for f in FASHION_MNIST_FILES}}


# --------------------------------------------------------------------------- gpu-cost


def cmd_pack_cost(run_out: Path) -> int:
    """gpu_cost.sh's files in ``run_out`` as one results file, each part's fate read from
    its log: measured, failed, or left out for time (then the item runs again next slot)."""
    log = (run_out / "log.txt").read_text() if (run_out / "log.txt").exists() else ""
    parts = env("PARTS", " ".join(COST_PARTS)).split()
    fate = {}
    for part in parts:
        line = next((ln for ln in log.splitlines() if ln.startswith(f"== {part}: ")), "")
        if ": skipped" in line or ": out of time" in line:
            fate[part] = "not run: " + line.split(": ", 1)[1]
        elif ": failed" in line:
            fate[part] = line.split(": ", 1)[1]
        elif (run_out / COST_PARTS.get(part, "-")).exists():
            fate[part] = "measured"
        else:
            fate[part] = "not run"
    results = {}
    for path in sorted(run_out.glob("*.json")):
        results[path.stem] = json.loads(path.read_text())
    if (run_out / "epochs.jsonl").exists():
        results["epochs"] = [json.loads(line) for line in
                             (run_out / "epochs.jsonl").read_text().splitlines() if line.strip()]
    complete = all(f == "measured" or f.startswith("failed") for f in fate.values())
    record = {
        "item": "gpu-cost", "status": "complete" if complete else "partial", "parts": fate,
        "command": env("COST_COMMAND"), "queue": queue_record(env("DEVICE", "cuda")),
        "results": results,
        "summary_md": (run_out / "summary.md").read_text() if (run_out / "summary.md").exists()
        else "", "log": log,
    }
    dest = out_dir() / result_name("gpu-cost")
    dest.write_text(json.dumps(record, indent=1) + "\n")
    print(f"== gpu-cost: {record['status']} ({', '.join(f'{p} {f}' for p, f in fate.items())}) "
          f"-> {dest}")
    return 0


# --------------------------------------------------------------------------- ViT runs


def run_arms(tag: str, lr: float, seed: int, epochs: int, deadline: float,
             data: Path) -> list[dict[str, Any]]:
    """The four arms at once, each ``sigreg train`` in its own process, until they end or
    ``deadline`` (time.monotonic) passes; what each did, with the moment each epoch ended."""
    device = env("DEVICE", "cuda")
    base = Path(env("SCRATCH", "/tmp/gpu-queue")) / tag
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    settings = [f"data_dir={data}", f"device={device}", f"epochs={epochs}", f"lr={lr!r}",
                f"seed={seed}", *shlex.split(env("EXTRA"))]
    procs, logs, commands = {}, {}, {}
    launched = time.monotonic()
    for arm in ARMS:
        commands[arm] = train_command(arm, base / arm, settings)
        logs[arm] = base / f"{arm}.log"
        with logs[arm].open("w") as log:
            procs[arm] = subprocess.Popen(commands[arm], stdout=log, stderr=subprocess.STDOUT,
                                          cwd=ROOT, preexec_fn=interruptible)  # noqa: PLW1509 (no threads here)
    ends: dict[str, list[float]] = {arm: [] for arm in ARMS}  # s since launch, per epoch row
    gpu: list[list[float]] = []  # [s, utilisation %, memory MiB]: did four fill the device?
    while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        now = time.monotonic() - launched
        for arm in ARMS:
            ends[arm] += [round(now, 1)] * (len(epoch_rows(base / arm)) - len(ends[arm]))
        if device.startswith("cuda") and (not gpu or now - gpu[-1][0] >= 20):
            gpu.append([round(now, 1), *gpu_sample()])
        time.sleep(0.5)
    cut = [arm for arm, p in procs.items() if p.poll() is None]
    for arm in cut:
        procs[arm].send_signal(signal.SIGINT)  # the trainer keeps the last finished epoch
    for p in procs.values():
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    wall = time.monotonic() - launched
    for arm in ARMS:  # rows written in the last half second
        ends[arm] += [round(wall, 1)] * (len(epoch_rows(base / arm)) - len(ends[arm]))
    return [{"arm": arm, "run": base / arm, "log": logs[arm], "cut": arm in cut,
             "exit_status": procs[arm].returncode, "ends": ends[arm], "wall_s": round(wall, 1),
             "command": "PYTHONPATH=src " + shlex.join(commands[arm]), "settings": settings,
             "gpu_samples": gpu} for arm in ARMS]


def interruptible() -> None:
    """In a child before it starts: SIGINT back to its default. A shell runs a command started
    with ``&`` with SIGINT ignored, and a Python started with it ignored never raises
    KeyboardInterrupt, so the SIGINT that cuts a run at the deadline would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def train_command(arm: str, run: Path, settings: list[str]) -> list[str]:
    return [sys.executable, "-m", "sigreg.train.cli", "train", "--preset",
            f"fmnist-vit-full-{arm}", "--out", str(run), "--no-progress", "--set", *settings]


def epoch_rows(run: Path) -> list[dict[str, Any]]:
    from sigreg.train.rundir import read_rows

    return [r for r in read_rows(run / "metrics.jsonl") if r.get("kind") == "epoch"]


def gpu_sample() -> list[float]:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=5, check=False)
        return [float(v) for v in done.stdout.splitlines()[0].split(",")]
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return []


def measured_timing(ends: list[float], epoch_times: list[float]) -> dict[str, float] | None:
    """Start-up and per-epoch wall time (test pass and checkpoint included) of one run, from
    when its epoch rows appeared (polled every 0.5 s), at least the training loop's own time
    per epoch (``epoch_times``, from its rows: epochs shorter than a poll would otherwise
    read as 0); None with fewer than two epochs."""
    if len(ends) < 2:
        return None
    epoch_s = max(statistics.median(b - a for a, b in pairwise(ends)),
                  statistics.median(epoch_times))
    return {"startup_s": round(max(ends[0] - epoch_s, 0.0), 1), "epoch_s": round(epoch_s, 2)}


def slowest(timings: list[dict[str, float] | None]) -> dict[str, float] | None:
    known = [t for t in timings if t]
    if not known:
        return None
    return {key: max(t[key] for t in known) for key in ("startup_s", "epoch_s")}


def calibrate(lr: float, seed: int, deadline: float, data: Path) -> dict[str, Any]:
    """One epoch of the four arms at once: start-up = wall time to the epoch row minus the
    epoch's training loop; epoch = that loop's time (epoch 1, warm-up included)."""
    runs = run_arms("calibration", lr, seed, 1, deadline, data)
    per_arm = []
    for run in runs:
        rows = epoch_rows(run["run"])
        if not rows:  # the log stays behind on the device machine: say its end here
            tail = " | ".join(run["log"].read_text().splitlines()[-3:])
            raise RuntimeError(f"calibration: the {run['arm']} arm finished no epoch (exit "
                               f"status {run['exit_status']}): {tail}")
        per_arm.append({"arm": run["arm"], "first_row_s": run["ends"][0],
                        "epoch_time": round(rows[0]["epoch_time"], 2)})
    return {"startup_s": max(a["first_row_s"] - a["epoch_time"] for a in per_arm),
            "epoch_s": max(a["epoch_time"] for a in per_arm), "arms": per_arm}


class NotNow(Exception):
    """The item does not fit in this slot; the message says why."""


def plan(item: str, left: float, data: Path) -> tuple[int, dict[str, Any]]:
    """The epoch count of ``item`` and how it was chosen (see the module docstring)."""
    if env("EPOCHS"):
        return int(env("EPOCHS")), {"rule": "EPOCHS given"}
    folders = [out_dir(), done_dir()]
    if item != FIRST_VIT:
        first = read_result(FIRST_VIT, folders)
        if first is None or not is_done(FIRST_VIT, first[1]):
            raise NotNow(f"needs {FIRST_VIT}'s results first (its epoch count)")
        epochs = first[1][0]["epochs"]
        timing = slowest([r.get("timing") for r in first[1]])
        rule = {"rule": f"{FIRST_VIT}'s epoch count", "from": first[0].name, "timing": timing}
        if timing:
            need = timing["startup_s"] + epochs * timing["epoch_s"] * PLAN_MARGIN + END_RESERVE_S
            rule["need_s"] = round(need)
            if need > left:
                raise NotNow(f"{epochs} epochs need about {need:.0f} s, {left:.0f} s left")
        return epochs, rule
    if left < float(env("VIT_MIN_S", "400")):
        raise NotNow(f"{left:.0f} s left, under VIT_MIN_S={env('VIT_MIN_S', '400')} (this item "
                     "sets every later one's epoch count: it gets a slot of its own)")
    start = time.monotonic()
    earlier = [r.get("timing") for name in VIT_ITEMS
               for found in [read_result(name, folders)] if found for r in found[1]]
    timing = slowest(earlier)
    rule: dict[str, Any] = {"rule": "fill the time left", "timing": timing,
                            "timing_from": "earlier queue runs"}
    if timing is None:
        calibration = calibrate(*VIT_ITEMS[item], start + left - END_RESERVE_S, data)
        timing = {k: round(calibration[k], 2) for k in ("startup_s", "epoch_s")}
        rule.update(timing=timing, timing_from="calibration in this slot",
                    calibration=calibration)
        print(f"   calibration: start-up {timing['startup_s']:.1f} s, epoch "
              f"{timing['epoch_s']:.1f} s (slowest arm; {time.monotonic() - start:.0f} s)")
    left -= time.monotonic() - start
    fit = (left - timing["startup_s"] - END_RESERVE_S) / (timing["epoch_s"] * PLAN_MARGIN)
    most, least = int(env("MAX_EPOCHS", "100")), int(env("MIN_EPOCHS", "3"))
    epochs = min(most, math.floor(fit))
    rule.update(left_s=round(left), max_epochs=most)
    if epochs < min(least, most):
        raise NotNow(f"only {max(epochs, 0)} epochs fit in {left:.0f} s "
                     f"(MIN_EPOCHS={env('MIN_EPOCHS', '3')})")
    return epochs, rule


def run_record(item: str, lr: float, seed: int, epochs: int, rule: dict[str, Any],
               run: dict[str, Any], data: dict[str, Any], queue: dict[str, Any]) -> dict[str, Any]:
    """One JSON line: the run's settings, state, per-epoch curves and provenance."""
    rows = epoch_rows(run["run"])
    summary_path = run["run"] / "summary.json"
    log_tail = run["log"].read_text().splitlines()[-5:] if run["log"].exists() else []
    if summary_path.exists() and run["exit_status"] == 0:
        state = "finished"
    elif run["cut"]:
        state = "cut"
    else:
        state = "diverged" if any("non-finite" in line for line in log_tail) else "failed"
    best = max(rows, key=lambda r: r["test_acc"], default=None)
    provenance = run["run"] / "provenance.json"
    config = run["run"] / "config.json"
    return {
        "item": item, "preset": f"fmnist-vit-full-{run['arm']}", "arm": run["arm"], "lr": lr,
        "seed": seed, "epochs": epochs, "epochs_done": len(rows), "state": state,
        "final_test_acc": rows[-1]["test_acc"] if rows and state == "finished" else None,
        "best_test_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        **{key: [r[key] for r in rows] for key in ("test_acc", "test_loss", "train_loss",
                                                    "train_acc", "reg_loss", "epoch_time")},
        "epoch_end_s": run["ends"], "wall_s": run["wall_s"], "exit_status": run["exit_status"],
        "timing": measured_timing(run["ends"], [r["epoch_time"] for r in rows]),
        "epochs_plan": rule, "parallel": len(ARMS),
        "gpu_samples": run["gpu_samples"], "settings": run["settings"],
        "command": run["command"],
        "config": json.loads(config.read_text()) if config.exists() else None,
        "provenance": json.loads(provenance.read_text()) if provenance.exists() else None,
        "data": data, "queue": queue,
        **({"log_tail": log_tail} if state in ("failed", "diverged") else {}),
    }


def cmd_vit(item: str, left: float) -> int:
    start = time.monotonic()
    lr, seed = VIT_ITEMS[item]
    data = find_data()
    if data is None:
        return cmd_check_data()
    try:
        epochs, rule = plan(item, left, data)
    except NotNow as why:
        print(f"== {item}: not run in this slot: {why}")
        return 0
    except RuntimeError as err:  # the calibration failed: the arms' logs say why
        print(f"== {item}: {err}")
        return 1
    left -= time.monotonic() - start
    print(f"   {len(ARMS)} arms at once, lr {lr:g}, seed {seed}, {epochs} epochs "
          f"({rule['rule']}), {left:.0f} s left")
    runs = run_arms(item, lr, seed, epochs, time.monotonic() + left - END_RESERVE_S, data)
    info, queue = data_record(data), queue_record(env("DEVICE", "cuda"))
    records = [run_record(item, lr, seed, epochs, rule, run, info, queue) for run in runs]
    dest = out_dir() / result_name(item)
    dest.write_text("".join(json.dumps(r) + "\n" for r in records))
    for r in records:
        acc = "-" if r["best_test_acc"] is None else f"{100 * r['best_test_acc']:.2f} %"
        final = "-" if r["final_test_acc"] is None else f"{100 * r['final_test_acc']:.2f} %"
        print(f"   {r['arm']:6s} {r['state']:8s} {r['epochs_done']}/{epochs} epochs, test acc "
              f"final {final}, best {acc}")
    print(f"== {item}: -> {dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pending")
    sub.add_parser("check-data")
    sub.add_parser("pack-cost").add_argument("run_out", type=Path)
    p = sub.add_parser("vit")
    p.add_argument("item", choices=list(VIT_ITEMS))
    p.add_argument("--left", type=float, required=True, help="seconds left of the budget")
    args = parser.parse_args(argv)
    if args.command == "pending":
        return cmd_pending()
    if args.command == "check-data":
        return cmd_check_data()
    if args.command == "pack-cost":
        return cmd_pack_cost(args.run_out)
    return cmd_vit(args.item, args.left)


if __name__ == "__main__":
    sys.exit(main())
