"""`spectra eval`: local task data, results JSON/markdown, perplexity, and clear errors on bad input."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-eval not installed (the eval extra; scripts/setup.sh installs it)")
pytest.importorskip("transformers", reason="transformers not installed (the hf extra; scripts/setup.sh installs it)")

from spectra.cli import main  # noqa: E402
from spectra.eval import results as R  # noqa: E402
from spectra.eval import tasks as T  # noqa: E402
from helpers.random_llama import make_random_llama  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import shared_data

    return make_random_llama(tmp_path_factory.mktemp("llama") / "tiny", shared_data("tokenizer", "gpt-neox-20b.json"))


def test_spectra6_end_to_end_from_local_data(tiny, shared, tmp_path, capsys):
    data = shared("eval")
    text = shared("text", "ptb-valid.txt")
    out = tmp_path / "res" / "results.json"
    rc = main(["eval", str(tiny), "--tasks", "spectra6", "--task-data", str(data), "--limit", "4",
               "--ppl", str(text), "--ppl-max-tokens", "600", "--ppl-seq-len", "256", "--ppl-stride", "128",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "6-task average" in printed and "| arc_challenge |" in printed
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == set(T.SPECTRA6)
    for t, metric in T.SIX_TASK_METRIC.items():
        assert 0.0 <= res["tasks"][t][metric] <= 1.0 and res["tasks"][t]["n"] == 4
        assert "version" in res["tasks"][t]
        assert len(res["data_fingerprints"][t]["sha256"]) == 64
    avg = sum(res["tasks"][t][m] for t, m in T.SIX_TASK_METRIC.items()) / 6
    assert res["six_task_avg"] == pytest.approx(avg)
    assert res["model"] == str(tiny.resolve()) and res["family"] == "floatlm" and "step" in res
    p = res["ppl"][str(text)]
    assert p["tokens"] == 600 and p["stride"] == 128
    assert p["ppl"] == pytest.approx(2 ** (p["bits_per_byte"] * p["bytes"] / p["tokens"]), rel=1e-6)
    assert (out.with_suffix(".md")).read_text().startswith("### ")


def test_unknown_task_lists_available(tiny, shared, capsys):
    rc = main(["eval", str(tiny), "--tasks", "arc_eazy", "--task-data", str(shared("eval")), "--limit", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown task 'arc_eazy'" in err and "did you mean 'arc_easy'" in err and "spectra6" in err
    assert "hellaswag" in err  # the available local tasks are listed


def test_missing_local_file_names_file_and_schema(tiny, tmp_path, capsys):
    rc = main(["eval", str(tiny), "--tasks", "piqa", "--task-data", str(tmp_path), "--limit", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "piqa.jsonl not found" in err and "goal, sol1, sol2, label" in err


def test_malformed_local_file(tiny, tmp_path, capsys):
    (tmp_path / "boolq.jsonl").write_text('{"question": "q", "passage": "p", "label": 1}\n{"question": "q"}\n')
    rc = main(["eval", str(tiny), "--tasks", "boolq", "--task-data", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "boolq.jsonl: line 2 lacks key 'passage'" in err
    (tmp_path / "boolq.jsonl").write_text("not json\n")
    assert main(["eval", str(tiny), "--tasks", "boolq", "--task-data", str(tmp_path)]) == 2
    assert "line 1 is not valid JSON" in capsys.readouterr().err


def test_not_a_model_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["eval", str(tmp_path), "--tasks", "arc_easy"]) == 2
    assert "is not a model directory: no config.json" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err or "is not a directory" in err


def test_group_skips_tasks_without_local_data_with_reason(shared, tmp_path):
    setup = T.write_local_tasks(T.expand_tasks("spectra13"), shared("eval"), tmp_path, explicit=set())
    assert set(setup.skipped) == {"sciq", "triviaqa"}  # not in the shared pack
    assert "sciq.jsonl not found" in setup.skipped["sciq"]
    assert "crows_pairs_english" in setup.tasks and "original CrowS-Pairs" in setup.notes["crows_pairs_english"]
    rows = [json.loads(x) for x in (tmp_path / "data" / "crows_pairs_english.jsonl").read_text().split("\n") if x]
    assert len(rows) == 1508 and set(rows[0]) >= {"sent_more", "sent_less", "bias_type"}
    subj = sorted(tmp_path.glob("mmlu_*_continuation.yaml"))
    assert len(subj) == 57
    n = sum((tmp_path / "data" / f"mmlu_{p.name[5:-len('_continuation.yaml')]}.jsonl").read_text().count("\n")
            for p in subj)
    assert n == 14042
    cfg = json.loads((tmp_path / "winogrande.yaml").read_text())
    assert cfg["dataset_kwargs"]["data_files"]["validation"].endswith("winogrande_hf_reconstructed.jsonl")
    assert cfg["include"].endswith("winogrande/default.yaml") and cfg["training_split"] is None


def test_crows_pairs_and_mmlu_run_through_lm_eval(tiny, shared, tmp_path):
    """The converted CrowS-Pairs and per-subject MMLU files load in lm-eval's own task definitions."""
    import spectra.eval

    res = spectra.eval.evaluate(str(tiny), tasks="crows_pairs_english,mmlu_continuation", task_data=shared("eval"),
                                limit=1, out=tmp_path / "r.json", bootstrap_iters=0, progress=False)
    assert 0 <= res["tasks"]["crows_pairs_english"]["pct_stereotype"] <= 1
    assert res["tasks"]["crows_pairs_english"]["likelihood_diff"] > 0
    assert 0 <= res["tasks"]["mmlu_continuation"]["acc"] <= 1
    assert res["lm_eval"]["n-samples"]["mmlu_abstract_algebra_continuation"]["effective"] == 1
    assert "| crows_pairs_english |" in R.markdown(res)


def test_six_task_average_needs_all_six():
    tasks = {t: {m: 0.5} for t, m in T.SIX_TASK_METRIC.items()}
    assert R.six_task_average(tasks) == 0.5
    tasks["arc_easy"] = {"acc": 0.9}  # acc is not the headline metric for ARC
    assert R.six_task_average(tasks) is None


def test_import_registers_spectra_model():
    from lm_eval.api.registry import get_model

    from spectra.eval.lm import SpectraLM

    assert get_model("spectra") is SpectraLM


@pytest.mark.slow  # lm-eval's CLI indexes all of its tasks: ~30 s on a loaded 2-core machine
def test_python_m_spectra_harness_registers_model(tiny, shared, tmp_path):
    import subprocess
    import sys

    inc = tmp_path / "tasks"
    T.write_local_tasks(["arc_easy"], shared("eval"), inc)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "spectra.harness", "--model", "spectra", "--model_args",
                        f"pretrained={tiny},threads=1", "--tasks", "arc_easy", "--limit", "3", "--include_path",
                        str(inc), "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "|arc_easy|" in p.stdout.replace(" ", "")
