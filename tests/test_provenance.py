"""sigreg.train.provenance: the record is plain data, so a checkpoint holding it loads with
``weights_only=True`` (a ``TorchVersion`` in it made every resume and probe fail)."""

from __future__ import annotations

import json

import torch

from sigreg.train import checkpoint
from sigreg.train.provenance import provenance


def test_record_is_plain_json_data():
    record = provenance("cpu")
    assert all(type(v) in (str, int, bool, type(None)) for v in record.values()), record
    assert json.loads(json.dumps(record)) == record
    assert record["torch"] == torch.__version__ and record["device"] == "cpu"


def test_a_checkpoint_holding_it_loads_weights_only(tmp_path):
    path, record = tmp_path / "checkpoint.pt", provenance("cpu")
    checkpoint.save_atomic({"provenance": [record]}, path)
    assert torch.load(path, weights_only=True)["provenance"] == [record]
