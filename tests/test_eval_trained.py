"""A briefly trained micro FloatLM and TriLM evaluate end to end on spectra6 from local data (slow)."""

import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-eval not installed (the eval extra; scripts/setup.sh installs it)")
pytest.importorskip("transformers", reason="transformers not installed (the hf extra; scripts/setup.sh installs it)")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["floatlm", "trilm"])
def test_trained_micro_spectra6_end_to_end(shakes_data, trained_ckpt, tmp_path, family, capsys):
    from conftest import RECIPES, shared_data

    from spectra.cli import main

    ckpt = trained_ckpt("micro", family)  # conftest's shared micro run
    vocab, recipe = RECIPES["micro"]
    data_dir = shakes_data(vocab)
    out = tmp_path / f"{family}.json"
    rc = main(["eval", str(ckpt), "--tasks", "spectra6", "--task-data", str(shared_data("eval")), "--limit", "20",
               "--ppl", str(shared_data("text", "ptb-valid.txt")), "--ppl-max-tokens", "2000", "--ppl-seq-len", "128",
               "--val-data", str(data_dir), "--val-seq-len", "128", "--val-windows", "16", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "6-task average" in printed
    res = json.loads(out.read_text())
    assert res["family"] == family and res["step"] == recipe["schedule.steps"] and res["tokens"]
    assert res["six_task_avg"] is not None and 0 < res["six_task_avg"] < 1
    assert set(res["tasks"]) == {"arc_challenge", "arc_easy", "hellaswag", "piqa", "boolq", "winogrande"}
    # a trained model beats uniform guessing over its vocabulary on held-out shakespeare
    assert res["val_loss"] < math.log(vocab)
    assert res["data_fingerprints"]["val_data"]["fingerprint"]
    p = next(iter(res["ppl"].values()))
    assert p["tokens"] == 2000 and p["bits_per_byte"] > 0
