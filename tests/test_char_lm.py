"""experiments/char_lm.py (issue 12, item 5) on a tiny generated corpus: it trains every arm,
writes its files, and a rerun skips the finished runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import char_lm

TINY = ["--steps", "3", "--eval-every", "2", "--eval-batches", "1", "--batch", "4",
        "--context", "16", "--dim", "16", "--depth", "1", "--heads", "2", "--sketch-dim", "8",
        "--lrs", "1e-3", "--seeds", "1"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "fortunes"
    d.mkdir()
    text = "\n%\n".join(f"Fortune number {i}: a penny saved is a penny earned." for i in range(60))
    (d / "wisdom").write_text(text)
    (d / "wisdom.dat").write_bytes(b"\x00binary index, not text")
    return d


def test_trains_every_arm_and_a_rerun_skips_them(corpus: Path, tmp_path: Path, one_thread):
    out = tmp_path / "lm"
    assert char_lm.main(["--out", str(out), "--corpus", str(corpus), *TINY]) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["arm"] for line in lines] == ["none", "weak", "strong"]
    for line in lines:
        r = json.loads(line)
        assert r["diverged_at"] is None and 0 < r["final_val_bits"] < 9
        assert [s for s, _ in r["val_curve"]] == [2, 3]
        (record,) = r["provenance"]  # the process that trained it
        assert {"sigreg", "commit", "dirty", "torch", "device", "date"} <= set(record)
    table = (out / "char_lm.md").read_text()
    assert table.startswith("| lr | none | weak | strong |")
    assert "| lr | weak - none | strong - none |" in table
    assert (out / "char_lm.png").stat().st_size > 0
    assert char_lm.main(["--out", str(out), "--corpus", str(corpus), *TINY]) == 0
    assert (out / "results.jsonl").read_text().splitlines() == lines


def test_scale_invariant_arm_on_held_out_seeds(corpus: Path, tmp_path: Path, one_thread):
    out = tmp_path / "lm"
    argv = ["--out", str(out), "--corpus", str(corpus), *TINY, "--first-seed", "3",
            "--arms", "weak", "weak-scale-invariant"]
    assert char_lm.main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["seed"]) for r in rows] == [("weak", 3), ("weak-scale-invariant", 3)]
    assert rows[0]["final_val_bits"] != rows[1]["final_val_bits"]  # another loss trained it
    assert "| lr | weak | weak-scale-invariant |" in (out / "char_lm.md").read_text()


def test_a_folder_of_runs_with_other_settings_is_refused(corpus: Path, tmp_path: Path, capsys,
                                                         one_thread):
    out = tmp_path / "lm"
    assert char_lm.main(["--out", str(out), "--corpus", str(corpus), *TINY, "--arms", "weak"]) == 0
    before = (out / "results.jsonl").read_text()
    argv = ["--out", str(out), "--corpus", str(corpus), *TINY, "--arms", "weak", "--alpha", "0.3"]
    assert char_lm.main(argv) == 2
    assert "holds runs with {'alpha': 0.01}" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == before


def test_missing_corpus_is_a_clean_error(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exc:
        char_lm.main(["--out", str(tmp_path / "lm"), "--corpus", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
    assert "apt-get install fortunes" in capsys.readouterr().err
    assert not (tmp_path / "lm").exists()
