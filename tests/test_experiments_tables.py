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


def test_scale_invariant(capsys):
    import scale_invariant
    assert scale_invariant.main(["--tables", raw("scale-invariant-report-cpu.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "| vit5k-lr0.03 | 26.15 ± 2.88 (n=5) | 45.09 ± 3.30 (n=5) |" in out
    assert "| vit5k-lr0.03 | +18.9 [+12.1, +25.8] (5/5) |" in out
