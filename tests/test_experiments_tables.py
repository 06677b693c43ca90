"""The study scripts' ``--tables`` paths on the committed raw files in ``experiments/``: no
training, and the tables docs/studies.md quotes come out of them (mean ± std and the paired
differences with their intervals)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import char_lm
import demo_search
import k_layers
import soft_bn
import studies
import sweep_tables
import vit_stability


def raw(name: str) -> str:
    return str(EXPERIMENTS / name)


def test_soft_bn(capsys):
    assert soft_bn.main(["--tables", raw("soft-bn-cpu.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "| 10 | 56.01 ± 1.67 (n=3) | 73.98 ± 2.43 (n=3) | 69.81 ± 0.70 (n=3) |" in out
    assert "| 10 | +18.0 [+11.6, +24.4] (3/3) | +13.8 [+8.2, +19.4] (3/3) |" in out
    assert soft_bn.main(["--tables", raw("soft-bn-cpu.jsonl"), "--baseline", "bn"]) == 0
    assert "| 20 | -73.5 [-73.9, -73.0] (0/3) | -55.0 [-56.3, -53.7] (0/3) |" in \
        capsys.readouterr().out


def test_vit_stability(capsys):
    argv = ["--tables", raw("vit-stability-cpu.jsonl"), "--lrs", "1e-3", "3e-3", "1e-2", "3e-2"]
    assert vit_stability.main(argv) == 0
    out = capsys.readouterr().out
    assert "| 0.001 | 54.40 ± 4.03 | 65.95 ± 0.49 | 33.40 ± 10.61 | 54.42 ± 2.02 |" in out
    assert "| 0.003 | +9.9 [-83.8, +103.6] (2/2) | -7.4 [-150.3, +135.5] (1/2) | " \
        "+11.7 [-54.1, +77.4] (2/2) |" in out


def test_k_layers(capsys):
    assert k_layers.main(["--tables", raw("k-layers-cpu.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "| 128 | +18.9 [+14.7, +23.2] (2/2) | +18.6 [+3.1, +34.1] (2/2) |" in out
    assert "| 512 | +19.5 [no interval: 1 seed] (1/1) |" in out
    assert "| 8 | -15.2 [-15.5, -15.0] (0/2) | -4.6 [-24.4, +15.2] (0/2) |" in out


def test_char_lm_needs_no_corpus(capsys, tmp_path):
    argv = ["--tables", raw("char-lm-cpu.jsonl"), "--corpus", str(tmp_path / "nowhere")]
    assert char_lm.main(argv) == 0
    out = capsys.readouterr().out
    assert "| 0.003 | 3.087 ± 0.009 (n=2) | 2.921 ± 0.022 (n=2) | 3.566 ± 0.011 (n=2) |" in out
    assert "| 0.001 | -0.196 [-0.442, +0.050] (0/2) | +0.270 [+0.082, +0.458] (2/2) |" in out


@pytest.mark.parametrize("name, line", [
    ("studies-cpu.jsonl", "| variant | vicreg - strong | +1.3 [-3.3, +6.0] (2/3) |"),
    ("studies-gpu-h100.jsonl", "| sketch | resample - fixed | +2.1 [-1.5, +5.8] (3/5) |"),
])
def test_studies(name, line, capsys):
    assert studies.main(["--tables", raw(name)]) == 0
    assert line in capsys.readouterr().out


def test_demo_search(capsys):
    demo_search.main(["--tables", raw("search-gpu-h100.jsonl")])
    out = capsys.readouterr().out
    assert "| mlp-d10-w256-e5 | +14.1 [+9.3, +18.9] (3/3) | +17.1 [+10.2, +24.1] (3/3) |" in out


def test_sweep_tables(capsys):
    files = [raw(f) for f in ("sweep-weak-cpu.json", "sweep-weak-a0.5-gpu-h100.json",
                              "sweep-weak-k-gpu-h100.json")]
    assert sweep_tables.main(files) == 0
    out = capsys.readouterr().out
    assert "| 0.3 | -0.1 [-0.8, +0.6] (1/3) | - | - | -9.0 [-19.3, +1.2] (0/3) |" in out
    assert sweep_tables.main([files[0], files[0]]) == 2  # the same runs twice: refused
    assert "more than one file" in capsys.readouterr().err


def test_a_cell_of_one_value_has_no_spread():
    from _tables import cell

    assert cell([56.0, 58.0]) == "57.00 ± 1.41 (n=2)"
    assert cell([56.0]) == "56.00 (n=1)" and cell([56.0], count=False) == "56.00"
    assert cell([]) == "-"


def test_scale_invariant_collects_what_ran(tmp_path, capsys):
    """--collect labels each run from its own config (not its folder's name), keeps the report
    seeds, takes char_lm rows and committed rows, and refuses a second value for a cell."""
    import json

    import strength

    def run(name, seed, acc, **config):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        base = {"model": "mlp", "model_args": {"depth": 10, "width": 256, "init": "he"},
                "preset": "fmnist-mlp-d10-weak", "lr": 0.1, "sigreg": "weak", "alpha": 0.1,
                "scale_invariant": False, "seed": seed}
        (d / "summary.json").write_text(json.dumps(
            {"final_test_acc": acc, "config": {**base, **config}}))

    for seed, (none, ours) in zip((3, 4, 2), ((0.80, 0.79), (0.82, 0.80), (0.5, 0.5))):
        run(f"a-{seed}", seed, none, sigreg="none")
        run(f"misnamed-none-{seed}", seed, ours, scale_invariant=True)
    lm = tmp_path / "runs" / "lm"
    lm.mkdir()
    (lm / "results.jsonl").write_text("".join(json.dumps(
        {"arm": arm, "lr": 0.03, "seed": 3, "alpha": alpha, "final_val_bits": bits,
         "provenance": []}) + "\n" for arm, alpha, bits in
        (("none", None, 3.7), ("weak-scale-invariant", 0.01, 3.4))))
    committed = tmp_path / "init.jsonl"
    committed.write_text(json.dumps({"depth": 10, "init": "he", "arm": "weak", "seed": 3,
                                     "state": "finished", "final_test_acc": 0.81,
                                     "provenance": []}) + "\n")
    out = tmp_path / "raw.jsonl"
    argv = ["--collect", str(tmp_path / "runs"), "--reuse", str(committed), "--out", str(out)]
    assert strength.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["setting"], r["arm"], r["seed"]) for r in rows} == {
        ("mlp d10 he", "none", 3), ("mlp d10 he", "none", 4),
        ("mlp d10 he", "scale-invariant 0.1", 3), ("mlp d10 he", "scale-invariant 0.1", 4),
        ("mlp d10 he", "weak 0.1", 3), ("lm lr 0.03", "none", 3),
        ("lm lr 0.03", "scale-invariant 0.01", 3)}  # seed 2 chose the design: left out
    text = capsys.readouterr().out
    assert "| mlp d10 he | 81.00 ± 1.41 (n=2) | 81.00 (n=1) | 79.50 ± 0.71 (n=2) |" in text
    assert "| lm lr 0.03 | 3.700 (n=1) | 3.400 (n=1) |" in text
    run("again", 3, 0.7, sigreg="none")
    out.unlink()
    with pytest.raises(SystemExit) as exc:
        strength.main(argv)
    assert exc.value.code == 2 and "twice" in capsys.readouterr().err
    assert not out.exists()  # nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        strength.main(["--collect", str(empty), "--out", str(out)])
    assert exc.value.code == 2 and "nothing to collect" in capsys.readouterr().err
    assert not out.exists()


def test_scale_invariant_refuses_a_bad_form_or_figure(tmp_path, capsys):
    import strength

    for argv, words in ((["--collect", str(tmp_path), "--out", str(tmp_path / "r.jsonl"),
                          "--form", "mine"], "--form must start with 'scale-invariant'"),
                        (["--tables", raw("scale-invariant-report-cpu.jsonl"), "--figure",
                          str(tmp_path / "f.pdf")], "--figure must name a .png file"),
                        (["--tables", raw("char-lm-cpu.jsonl")], "is not a raw file of this report"),
                        (["--tables", str(tmp_path / "none.jsonl")], "--tables: no file")):
        with pytest.raises(SystemExit) as exc:
            strength.main(argv)
        assert exc.value.code == 2 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_scale_invariant(capsys, tmp_path):
    import strength
    figure = tmp_path / "report.png"
    argv = ["--tables", raw("scale-invariant-report-cpu.jsonl"), "--figure", str(figure)]
    assert strength.main(argv) == 0
    out = capsys.readouterr().out
    assert "| vit-5k lr 0.03 | 26.15 ± 2.88 (n=5) | - | 36.24 ± 6.85 (n=5) |" in out
    assert ("| vit-5k lr 0.03 | - | +10.1 [+1.4, +18.8] (5/5) | - | - | -16.1 [-19.7, -12.5] "
            "(0/5) | - | +15.0 [+8.0, +22.0] (5/5) | +4.9 [-9.3, +19.1] (3/5) (best: weak 1e-06) |"
            ) in out
    assert "-5.7 [-11.4, -0.1] (1/5) (best: weak 0.3) |" in out
    assert "| lm lr 0.03 | - | -0.40 [-0.52, -0.27] (0/5) | - |" in out
    assert figure.stat().st_size > 0
    assert strength.main(["--tables", raw("scale-invariant-first-form-cpu.jsonl")]) == 0
    assert "| mlp d10 he | -0.0 [-1.2, +1.1] (2/5) | -0.8 [-1.5, -0.1] (0/5) | -3.6 [-4.9, -2.3] " \
        "(0/5) |" in capsys.readouterr().out


def test_strength_collects_auto_runs_with_their_weight(tmp_path, capsys):
    """An alpha="auto" run is its own arm, keeps its weight over training (thinned), is judged
    against the best fixed alpha like the scale-invariant arm, and --weights draws it; a raw
    file of an earlier report is reused row for row."""
    import json

    import strength

    def run(name, seed, acc, alphas=None, **config):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        base = {"model": "mlp", "model_args": {"depth": 10, "width": 256, "init": "default"},
                "preset": "fmnist-mlp-d10-weak", "lr": 0.1, "sigreg": "weak", "alpha": 0.1,
                "scale_invariant": True, "seed": seed}
        (d / "summary.json").write_text(json.dumps(
            {"final_test_acc": acc, "config": {**base, **config}}))
        if alphas is not None:
            (d / "metrics.jsonl").write_text("".join(json.dumps(
                {"kind": "epoch", "epoch": e + 1, "alpha_steps": chunk}) + "\n"
                for e, chunk in enumerate((alphas[:300], alphas[300:]))))

    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text("".join(json.dumps(
        {"setting": "mlp d10 default", "arm": arm, "seed": seed, "metric": "test accuracy (%)",
         "value": value, "source": "x", "provenance": []}) + "\n"
        for arm, seed, value in (("none", 3, 56.0), ("none", 4, 58.0), ("weak 0.1", 3, 66.0),
                                 ("weak 0.1", 4, 64.0), ("weak 0.3", 3, 72.0),
                                 ("weak 0.3", 4, 70.0))))
    steps = [0.1 + 0.4 * (i < 100) for i in range(450)]
    run("auto-3", 3, 0.71, steps, alpha="auto")
    run("auto-4", 4, 0.70, steps, alpha="auto")
    out = tmp_path / "raw.jsonl"
    argv = ["--collect", str(tmp_path / "runs"), "--reuse", str(earlier), "--out", str(out)]
    assert strength.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    auto = [r for r in rows if r["arm"] == "scale-invariant auto"]
    assert len(auto) == 2 and len(rows) == 8
    assert len(auto[0]["alpha_steps"]) <= strength.TRAJECTORY_POINTS
    assert auto[0]["alpha_steps"][0] == 0.5 and auto[0]["alpha_steps"][-1] == 0.1
    text = capsys.readouterr().out
    # auto - weak 0.3 (the best fixed alpha here): 71 - 72, 70 - 70
    assert "| -0.5 [-6.9, +5.9] (0/2) (best: weak 0.3) |" in text
    figure = tmp_path / "weights.png"
    assert strength.main(["--tables", str(out), "--weights", str(figure)]) == 0
    assert figure.stat().st_size > 10_000
    with pytest.raises(SystemExit) as exc:  # a raw file without auto runs
        strength.main(["--tables", str(earlier), "--weights", str(tmp_path / "w.png")])
    assert exc.value.code == 2 and "no auto run" in capsys.readouterr().err
    assert not (tmp_path / "w.png").exists()


def test_auto_weight_report(capsys, tmp_path):
    """The numbers docs/studies.md section 15 and the README quote come back from the raw file."""
    import strength
    weights = tmp_path / "weights.png"
    assert strength.main(["--tables", raw("auto-weight-report-cpu.jsonl"), "--weights",
                          str(weights)]) == 0
    out = capsys.readouterr().out
    assert "| 74.29 ± 1.83 (n=5) | 71.61 ± 2.38 (n=5) |" in out  # MLP d10 default: weak, strong auto
    assert "| +2.0 [+0.6, +3.4] (5/5) (best: weak 0.3) |" in out
    assert ("| lm lr 0.001 | 3.343 ± 0.023 (n=5) | 3.149 ± 0.026 (n=5) | 3.227 ± 0.028 (n=5) | "
            "3.151 ± 0.031 (n=5) | 3.237 ± 0.030 (n=5) | 3.374 ± 0.027 (n=5) | "
            "3.151 ± 0.031 (n=5) |") in out  # ... si 0.1, auto, auto with base 0.01
    assert "| +0.03 [+0.03, +0.04] (5/5) |" in out
    assert weights.stat().st_size > 10_000
