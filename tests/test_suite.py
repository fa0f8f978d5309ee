"""The suite end to end on a reduced plan (smallest sizes, few steps)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import shared_data
from spectra.errors import SpectraError
from spectra.suite import Suite, describe_plan, make_plan

REDUCED = dict(tokens=16 * 1024, batch_tokens=8 * 128, seq_len=128, quant_bits=[8, 4], calib_samples=8,
               calib_seqlen=128, eval_limit=4, val_windows=8, log_spaced_until=4, vocab_size=512)


def _plan(**kw):
    return make_plan("tiny", ["tiny1", "tiny2"], **{**REDUCED, **kw})


def test_plan_errors_and_dry_run():
    with pytest.raises(SpectraError, match="allowed: tiny, small, spectra"):
        make_plan("huge")
    with pytest.raises(SpectraError, match="not in suite preset"):
        make_plan("tiny", ["99m"])
    text = describe_plan(make_plan("spectra"), flops=1e11)
    assert "3.9b" in text and "300,000,000,000 tokens" in text and "H100" in text


@pytest.fixture(scope="module")
def reduced_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "s"
    task_data = shared_data("eval")
    report = Suite(_plan(task_data=str(task_data)), out, progress=False).run()
    return out, report


def test_reduced_suite_end_to_end(reduced_suite):
    out, report = reduced_suite
    text = report.read_text()
    assert "TriLM" in text and "FloatLM" in text and "QuantLM 4" in text
    assert "a unigram model (train-split token frequencies) scores" in text
    assert "Packed TriLMs (native CPU engine)" in text
    for png in ["loss_curves.png", "scaling_params.png", "ppl_vs_bits.png"]:
        assert (report.parent / png).exists(), png
    models = json.loads((out / "models.json").read_text())["models"]
    fams = {(m["family"], m["size"]) for m in models}
    assert {("floatlm", "tiny1"), ("trilm", "tiny1"), ("q8", "tiny1"), ("q4", "tiny2")} <= fams
    for m in models:
        assert m["val_loss"] is not None and m["val_loss"] < 7.0
    # FloatLM and TriLM of a size read identical data in identical order
    first = {}
    for fam in ("floatlm", "trilm"):
        rows = [json.loads(l) for l in (out / "runs" / f"{fam}-tiny1" / "metrics.jsonl").read_text().splitlines() if l]
        first[fam] = [r["tokens"] for r in rows if "loss" in r][:5]
    assert first["floatlm"] == first["trilm"]
    # a second run with the same plan skips every stage (only the report is rewritten)
    plan = json.loads((out / "suite.json").read_text())["plan"]
    t = time.perf_counter()
    Suite(_plan(task_data=plan["task_data"]), out, progress=False).run()
    assert time.perf_counter() - t < 30
    # task data location does not change the suite's identity
    Suite(_plan(task_data=str(out.parent)), out, progress=False).check_dir()


def test_different_suite_refused(reduced_suite):
    out, _ = reduced_suite
    with pytest.raises(SpectraError, match="different suite"):
        Suite(_plan(tokens=48 * 1024), out, progress=False).check_dir()


def test_not_enough_tokens(tmp_path):
    with pytest.raises(SpectraError, match="needs"):
        Suite(_plan(tokens=10**9, eval_tasks=""), tmp_path / "s", progress=False).run()


@pytest.mark.slow
def test_killed_suite_resumes_to_same_results(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "spectra", "suite", "--preset", "tiny", "--sizes", "tiny1", "--tokens", "49152",
            "--no-tasks", "--quiet"]
    ref = tmp_path / "ref"
    subprocess.run(args + ["--out", str(ref)], check=True, env=env, timeout=900)
    cut = tmp_path / "cut"
    p = subprocess.Popen(args + ["--out", str(cut)], env=env)
    # kill once the TriLM run has written a checkpoint (mid-stage)
    deadline = time.time() + 600
    while time.time() < deadline and not list((cut / "runs" / "trilm-tiny1" / "checkpoints").glob("step-*")):
        time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    subprocess.run(args + ["--out", str(cut)], check=True, env=env, timeout=900)
    a = {m["id"]: m["val_loss"] for m in json.loads((ref / "models.json").read_text())["models"]}
    b = {m["id"]: m["val_loss"] for m in json.loads((cut / "models.json").read_text())["models"]}
    assert a == b
