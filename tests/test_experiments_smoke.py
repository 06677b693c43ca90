"""experiments/k_layers.py, vit_stability.py, soft_bn.py, studies.py and demo_search.py at
tiny sizes on synthetic data: every cell trains or is gathered, the tables (with paired
differences) and figures are written, finished runs are reused, and every results line carries
the run's provenance."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import demo_search
import init_control
import k_layers
import soft_bn
import studies
import vit_stability

from sigreg.train import cli

TINY = ["dataset=synthetic", "num_train=32", "num_test=16", "batch_size=16", "epochs=1"]


def assert_provenance(row: dict) -> None:
    """One record per start of the run, naming the code and machine that made it."""
    assert len(row["provenance"]) == 1
    record = row["provenance"][0]
    assert {"sigreg", "commit", "dirty", "torch", "device", "date"} <= set(record)
    assert record["device"] == "cpu"


def test_k_layers_trains_every_cell_and_reuses_finished_runs(tmp_path, one_thread, capsys):
    out = tmp_path / "kl"
    args = ["--out", str(out), "--seeds", "1", "--widths", "16", "--set", *TINY]
    assert k_layers.main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # Width part: K = 16/16, 16/4, 16 at width 16; split part: 2 weak + 4 strong cells.
    assert [(r["part"], r["cell"]) for r in rows] == [
        ("width", "w16-k1"), ("width", "w16-k4"), ("width", "w16-k16"),
        ("split", "weak-e16-l256"), ("split", "weak-e256-l16"),
        ("split", "strong-e8-l8"), ("split", "strong-e8-l64"),
        ("split", "strong-e64-l8"), ("split", "strong-e64-l64")]
    assert all(0 <= r["final_test_acc"] <= 1 for r in rows)
    for row in rows:
        assert_provenance(row)
    split = json.loads((tmp_path / "kl" / "split-strong-e8-l64-s0" / "config.json").read_text())
    assert split["sketch_dim_per_layer"] == "8,8,8,8,64,64,64,64,64"
    table = (out / "k_layers.md").read_text()
    # One seed: the paired cells say there is no interval.
    assert "| 16 | " in table and "[no interval: 1 seed] (" in table and "(baseline)" in table
    assert (out / "k_layers.png").stat().st_size > 0

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")}
    capsys.readouterr()
    assert k_layers.main(args) == 0  # a rerun trains nothing
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")} == mtimes


def test_vit_stability_commands_then_collect(tmp_path, one_thread, capsys):
    out = tmp_path / "vit"
    grid = ["--out", str(out), "--stem", "fmnist-vit-5k", "--lrs", "1e-3", "3e-3",
            "--arms", "none", "weak", "--seeds", "1",
            "--set", *TINY, "model.dim=16", "model.depth=1", "model.heads=2"]
    assert vit_stability.main([*grid, "--commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # 2 lr x 2 arms x 1 seed
    # Run two of them as xargs would: the run directory, then `sigreg` arguments, the output
    # going to <run>/train.log.
    for line in lines[:2]:
        run, *arguments = shlex.split(line)
        assert cli.main(arguments) == 0
        (Path(run) / "train.log").write_text(capsys.readouterr().out)

    assert vit_stability.main([*grid, "--collect"]) == 0
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["state"] for r in results] == ["finished", "finished", "missing", "missing"]
    assert [(r["lr"], r["arm"]) for r in results[:2]] == [(1e-3, "none"), (1e-3, "weak")]
    for row in results[:2]:
        assert_provenance(row)
        assert row["collapse_warnings"] == 0  # counted in the log the xargs line wrote
    assert results[2]["provenance"] == [] and results[2]["collapse_warnings"] is None
    table = (out / "vit_full.md").read_text()
    assert "1 missing" in table and (out / "stability.png").stat().st_size > 0
    assert (out / "curves.png").stat().st_size > 0
    assert [r["first_warning_step"] for r in results] == [None] * 4
    log = ("collapse warning: layer blocks.5 mean_cosine 1 > 0.99 in 8 measurements in a row "
           "(steps 1050-1225)\ncollapse warning: layer blocks.1 mean_cosine 1 > 0.99 in 8 "
           "measurements in a row (steps 875-1050)\n")
    assert vit_stability.first_warning_step(log) == 1050
    assert "| 0.001 | +" in table and "weak - none" in table  # the paired table, lr 1e-3
    assert "weak - tuned" in table  # against the baseline at its best lr (none here: missing)
    assert vit_stability.best_per_seed([{0: 50.0, 1: 60.0}, {0: 55.0, 2: 1.0}]) == {0: 55.0}
    # The live monitor's trace travels in the raw rows, so the per-run monitor table and the
    # figure come from the raw file alone.
    trace = results[0]["monitor"]
    assert trace and set(trace[0]) == {"step", "epoch", "eff_dim", "mean_cosine"}
    assert "first monitor warning" in table and "| lr 0.001 none s0 |" in table
    figure = tmp_path / "again.png"
    assert vit_stability.main(["--tables", str(out / "results.jsonl"), "--lrs", "1e-3", "3e-3",
                               "--arms", "none", "weak", "--figure", str(figure)]) == 0
    assert figure.stat().st_size > 0 and "| lr 0.001 weak s0 |" in capsys.readouterr().out


def test_a_run_still_training_gives_its_curve_so_far(tmp_path):
    run = tmp_path / "lr0.001-weak-s0"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"kind": "epoch", "epoch": 1, "test_acc": 0.3}\n'
        '{"kind": "monitor", "step": 0, "epoch": 1, "eff_dim": {"b": 1.5}, "mean_cosine": {"b": 0.2}}\n'
        '{"kind": "epoch", "epoch": 2, "test_acc": 0.4}\n')
    row = {"lr": 1e-3, "arm": "weak", "seed": 0, **vit_stability.outcome(run)}
    assert row["state"] == "unfinished" and row["final_test_acc"] is None
    assert row["test_acc"] == [0.3, 0.4] and row["monitor"][0]["eff_dim"] == {"b": 1.5}
    assert "| lr 0.001 weak s0 | 40.0 (2) | 40.0 (epoch 2, unfinished) | never | never | " \
        "1.50 -> 1.50 |" in vit_stability.monitor_table([row])
    assert "1 unfinished" in vit_stability.markdown([row], [1e-3], ["weak"])


def test_drop_epoch_is_the_first_epoch_5_points_under_the_best_before_it():
    assert vit_stability.drop_epoch([0.30, 0.50, 0.46, 0.44, 0.60]) == 4
    assert vit_stability.drop_epoch([0.30, 0.50, 0.46, 0.47]) is None
    assert vit_stability.drop_epoch([]) is None


def test_vit_stability_refuses_a_bad_setting_before_any_run(tmp_path, capsys):
    status = vit_stability.main(["--out", str(tmp_path / "v"), "--stem", "fmnist-vit-5k",
                                 "--commands", "--set", "epochs=0"])
    assert status == 2 and "error" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("argv", [["--widths", "8"], ["--seeds", "0"]])
def test_k_layers_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        k_layers.parse_args(argv)
    assert info.value.code == 2 and "must be" in capsys.readouterr().err


def test_soft_bn_rows_carry_provenance_and_a_paired_table(tmp_path, one_thread, capsys):
    out = tmp_path / "sb"
    args = ["--out", str(out), "--seeds", "1", "--depths", "10", "--arms", "none", "weak",
            "--set", *TINY]
    assert soft_bn.main(args) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["none", "weak"]
    for row in rows:
        assert_provenance(row)
    assert "| depth | weak - none |" in (out / "soft_bn.md").read_text()


def test_studies_rows_carry_provenance_and_a_paired_table(tmp_path, one_thread, capsys):
    out = tmp_path / "st"
    args = ["--out", str(out), "--study", "sketch", "--seeds", "1", "--no-progress",
            "--set", *TINY]
    assert studies.main(args) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["fixed", "resample"]
    for row in rows:
        assert_provenance(row)
    assert "| sketch | resample - fixed | " in (out / "studies.md").read_text()


def test_demo_search_rows_carry_provenance(one_thread):
    row = demo_search.run_one(("tiny", ["model=mlp", "model.depth=2", "model.width=8",
                                        *TINY], "weak", 0))
    assert row["setting"] == "tiny" and 0 <= row["final"] <= 1
    assert_provenance(row)


def test_init_control_commands_then_collect(tmp_path, one_thread, capsys):
    out = tmp_path / "init"
    grid = ["--out", str(out), "--depths", "10", "--inits", "default", "he", "--arms", "none",
            "weak", "--seeds", "3", "4", "--set", *TINY, "model.width=16"]
    assert init_control.main([*grid, "--commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8  # 2 inits x 2 arms x 2 seeds, seed-major
    assert "model.init=he" in lines[2] and "seed=3" in lines[3] and "seed=4" in lines[4]
    for line in lines:
        _run, *arguments = shlex.split(line)
        assert cli.main(arguments) == 0
    capsys.readouterr()
    he = json.loads((out / "d10-he-none-s3" / "config.json").read_text())
    assert he["model_args"]["init"] == "he" and he["seed"] == 3

    assert init_control.main([*grid, "--collect"]) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["state"] for r in rows] == ["finished"] * 8
    for row in rows:
        assert_provenance(row)
    table = (out / "init_control.md").read_text()
    assert "| 10, he | " in table and "weak - none" in table and "default none - he none" in table
    assert (out / "init_control.png").stat().st_size > 0
    # The tables again from the results file alone, as from a committed raw file.
    capsys.readouterr()
    assert init_control.main([*grid[2:], "--tables", str(out / "results.jsonl")]) == 0
    assert capsys.readouterr().out.strip() == table.strip()


def test_init_control_refuses_a_bad_setting_before_any_run(tmp_path, capsys):
    status = init_control.main(["--out", str(tmp_path / "i"), "--commands", "--set", "epochs=0"])
    assert status == 2 and "epochs" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()


