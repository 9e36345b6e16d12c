"""`amed train` and `amed sample --predictor` end to end on digits-gmm (tiny runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.cli import main


def test_train_then_sample_with_predictor(tmp_path, capsys):
    out = tmp_path / "ckpt"
    rc = main(["train", "--teacher", "digits-gmm", "--solver", "amed+ipndm", "--nfe", "3", "--seed", "1",
               "--out", str(out), "--trajectories", "32", "--batch", "16", "--no-progress"])
    assert rc == 0
    spec = json.loads((out / "sampler.json").read_text())
    assert spec["kind"] == "amed" and spec["solver"] == "amed+ipndm" and spec["nfe"] == 3 and spec["num_steps"] == 3
    assert spec["afs_in_history"] is False  # improved preset
    assert json.loads((out / "train.json").read_text())["updates"] == 2 * 2

    npz = tmp_path / "s.npz"
    rc = main(["sample", "--predictor", str(out), "--n", "48", "--rmse-samples", "8", "--reference-steps", "40",
               "--out", str(npz), "--out-dir", str(tmp_path / "eval"), "--grid-per-row", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "amed+ipndm" in text and "ipndm" in text.split("amed+ipndm", 2)[-1]
    with np.load(npz, allow_pickle=False) as d:
        assert d["samples"].shape == (48, 1, 8, 8) and np.isfinite(d["samples"]).all()
    for name in ("predictor-samples.png", "policy.png", "predictor-quality.json"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    rows = json.loads((tmp_path / "eval" / "predictor-quality.json").read_text())["rows"]
    assert [r["nfe"] for r in rows] == [3, 3]


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    rc = main(["train", "--teacher", "digits-gmm", "--solver", "amed", "--nfe", "4", "--afs", "on", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "nfe=4" in capsys.readouterr().err
    rc = main(["sample", "--predictor", str(tmp_path / "missing")])
    assert rc == 2 and "checkpoint" in capsys.readouterr().err
