"""Task data outside this repository: resolution order, the suite's plan/log/report say what runs and
why not, `spectra tasks fetch/list` (offline, load_dataset monkeypatched) scoring like the data pack."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from conftest import REPO  # noqa: E402
from spectra.cli import main  # noqa: E402
from spectra.errors import SpectraError  # noqa: E402
from spectra.eval import tasks as T  # noqa: E402


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SPECTRA_TASK_DATA", raising=False)
    monkeypatch.setenv("SPECTRA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_no_src_file_names_shared():
    hits = [str(p.relative_to(REPO)) for p in (REPO / "src").rglob("*") if p.is_file() and p.suffix in
            (".py", ".c", ".inc", ".h", ".yaml", ".json") and "../shared" in p.read_text(errors="replace")]
    assert hits == []


def test_resolution_order(clean_env, tmp_path, monkeypatch, shared):
    data = shared("eval")
    assert T.resolve_task_data(None, ["arc_easy"]).path is None  # nothing local: lm-eval's Hub loading
    cache = T.task_cache_dir()
    cache.mkdir(parents=True)
    shutil.copy(data / "piqa.jsonl", cache / "piqa.jsonl")
    assert T.resolve_task_data(None, ["arc_easy"]).path is None  # the cache lacks every asked task
    td = T.resolve_task_data(None, ["arc_easy", "piqa"])
    assert td.path == cache and td.source == "user cache"
    monkeypatch.setenv("SPECTRA_TASK_DATA", str(data))
    assert T.resolve_task_data(None, ["piqa"]) == T.TaskData(data, "$SPECTRA_TASK_DATA")
    assert T.resolve_task_data(tmp_path, ["piqa"]).path == tmp_path  # --task-data first
    assert T.resolve_task_data(None, ["mmlu"]).path is None  # not a local task: the Hub
    monkeypatch.setenv("SPECTRA_TASK_DATA", str(tmp_path / "nope"))
    with pytest.raises(SpectraError, match="SPECTRA_TASK_DATA='.*nope' is not a directory"):
        T.resolve_task_data(None, ["piqa"])
    run, skipped = T.task_status(["piqa", "sciq"], T.TaskData(cache, "user cache"))
    assert run == ["piqa"] and "sciq.jsonl not found" in skipped["sciq"]


def _fresh_clone(tmp_path) -> Path:
    """The repository's files (tracked + new, not ignored) in a directory with no ../shared next to it."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    dst = tmp_path / "nowhere" / "spectra-lm"
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    assert not (dst.parent / "shared").exists()
    return dst


def _spectra(clone: Path, args: list[str], env: dict, timeout=600) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("SPECTRA_TASK_DATA", "SPECTRA_TEST_DATA", "PYTHONPATH")}
    e.update(PYTHONPATH=str(clone / "src"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "spectra", *args], cwd=clone, env=e, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return _fresh_clone(tmp_path_factory.mktemp("clone"))


def test_fresh_clone_dry_run_says_what_runs(clone, tmp_path, shared):
    data = shared("eval")
    r = _spectra(clone, ["suite", "--preset", "tiny", "--dry-run"],
                 {"SPECTRA_TASK_DATA": str(data), "SPECTRA_HOME": str(tmp_path / "h")})
    assert r.returncode == 0, r.stderr
    assert "lm-eval tasks ($SPECTRA_TASK_DATA" in r.stdout
    assert "will run arc_challenge, arc_easy, hellaswag, piqa, boolq, winogrande" in r.stdout
    r = _spectra(clone, ["suite", "--preset", "tiny", "--dry-run"], {"SPECTRA_HOME": str(tmp_path / "h")})
    assert r.returncode == 0, r.stderr
    assert "NONE will run" in r.stdout and "skipped arc_challenge" in r.stdout
    assert "Hub is offline" in r.stdout and "spectra tasks fetch" in r.stdout


def test_report_lists_skipped_tasks():
    from spectra.report import markdown
    from spectra.report.collect import ModelRecord

    recs = [ModelRecord(id=f"trilm-{s}", family="trilm", size=s, params=p, non_embedding=p, size_bits=p,
                        val_loss=4.0) for s, p in (("tiny1", 1e6), ("tiny2", 2e6))]
    for r in recs:
        r.extra["tasks_skipped"] = {"piqa": "no local task data and the Hub is offline"}
    md = markdown(recs, {}, {}, {}, False)
    assert "## lm-eval tasks not run" in md and "No 6-task average" in md
    assert "- piqa (all models): no local task data and the Hub is offline" in md


@pytest.mark.slow
@pytest.mark.parametrize("with_data", [True, False])
def test_fresh_clone_main_job(clone, tmp_path, shared, with_data):
    """The README's main job (reduced: one size, few tokens) from a clone with no ../shared."""
    env = {"SPECTRA_HOME": str(tmp_path / "h")}
    if with_data:
        env["SPECTRA_TASK_DATA"] = str(shared("eval"))
    r = _spectra(clone, ["suite", "--preset", "tiny", "--sizes", "tiny1", "--tokens", "16384", "--eval-limit", "4",
                         "--out", str(tmp_path / "s")], env, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "s" / "report" / "report.md").read_text()
    if with_data:
        assert "## 6-task average by size and family" in report and "lm-eval tasks not run" not in report
    else:
        assert "NONE will run" in r.stdout and "[skip] lm-eval task arc_easy" in r.stdout
        assert "## lm-eval tasks not run" in report and "Hub is offline" in report
        res = json.loads((tmp_path / "s" / "eval" / "floatlm-tiny1.json").read_text())
        assert set(res["skipped"]) == set(T.SPECTRA6)


# ----------------------------------------------------------------------------- tasks fetch / list

def _fake_hub(monkeypatch, shared, n):
    """load_dataset answering the Hub ids of lm-eval's YAMLs with the data pack's first ``n`` rows."""
    datasets = pytest.importorskip("datasets", reason="datasets not installed (the eval extra)")
    data = shared("eval")
    by_id = {("allenai/ai2_arc", "ARC-Easy", "test"): "arc_easy.jsonl",
             ("aps/super_glue", "boolq", "validation"): "boolq.jsonl",
             ("baber/piqa", None, "validation"): "piqa.jsonl"}
    calls, real = [], datasets.load_dataset

    def load_dataset(path, name=None, split=None, **kw):
        if path in ("json", "csv"):  # lm-eval reading the local files: the real loader
            return real(path, name, split=split, **kw)
        calls.append((path, name, split))
        if (path, name, split) not in by_id:
            raise ConnectionError(f"offline test: no {path} {name} {split}")
        rows = [json.loads(x) for x in (data / by_id[(path, name, split)]).read_text().splitlines()[:n]]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_fetch_writes_layout_that_scores_like_the_pack(monkeypatch, shared, tmp_path, capsys, clean_env):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (the eval extra)")
    from helpers.random_llama import make_random_llama

    calls = _fake_hub(monkeypatch, shared, 12)
    d = tmp_path / "fetched"
    assert main(["tasks", "fetch", "--tasks", "arc_easy,boolq,piqa", "--dir", str(d)]) == 0
    assert calls == [("allenai/ai2_arc", "ARC-Easy", "test"), ("aps/super_glue", "boolq", "validation"),
                     ("baber/piqa", None, "validation")]
    man = json.loads((d / "manifest.json").read_text())
    for t in ("arc_easy", "boolq", "piqa"):
        e = man["tasks"][t]
        assert e["rows"] == 12 and e["sha256"] == T.sha256_file(d / e["file"])
    capsys.readouterr()
    assert main(["tasks", "list", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert "arc_easy" in out and "3 of 13 tasks available locally" in out
    (d / "piqa.jsonl").write_text((d / "piqa.jsonl").read_text() + "\n")  # tampered: list says so, rc 1
    assert main(["tasks", "list", "--dir", str(d)]) == 1
    assert "CHANGED" in capsys.readouterr().out

    model = make_random_llama(tmp_path / "m", shared("tokenizer", "gpt-neox-20b.json"))
    scores = {}
    for name, src in (("fetched", d), ("pack", shared("eval"))):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(model), "--tasks", "arc_easy,boolq", "--task-data", str(src), "--limit", "12",
                     "--bootstrap-iters", "0", "--out", str(out)]) == 0
        scores[name] = json.loads(out.read_text())["tasks"]
    for t in ("arc_easy", "boolq"):
        a, b = scores["fetched"][t], scores["pack"][t]
        assert {k: v for k, v in a.items() if k.startswith("acc")} == {k: v for k, v in b.items() if k.startswith("acc")}
        assert a["n"] == b["n"] == 12


def test_fetch_errors(monkeypatch, shared, tmp_path, clean_env, capsys):
    _fake_hub(monkeypatch, shared, 3)
    assert main(["tasks", "fetch", "--tasks", "mmlu", "--dir", str(tmp_path)]) == 2
    assert "has no local layout" in capsys.readouterr().err
    rc = main(["tasks", "fetch", "--tasks", "hellaswag", "--dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "could not load Hub dataset Rowan/hellaswag split validation" in err
    assert len(err.strip().splitlines()) == 1


def test_fetch_default_dir_is_the_cache_eval_reads(monkeypatch, shared, clean_env):
    _fake_hub(monkeypatch, shared, 5)
    assert main(["tasks", "fetch", "--tasks", "piqa"]) == 0
    assert (clean_env / "tasks" / "piqa.jsonl").is_file()
    assert T.resolve_task_data(None, ["piqa"]) == T.TaskData(clean_env / "tasks", "user cache")


def test_hub_sources_follow_lm_eval_yaml():
    pytest.importorskip("lm_eval", reason="lm-eval not installed (the eval extra)")
    from spectra.eval.fetch import hub_sources

    assert hub_sources("arc_challenge") == [("allenai/ai2_arc", "ARC-Challenge", "test")]  # via include:
    mm = hub_sources("mmlu_continuation")
    assert len(mm) == 57 and all(p == "cais/mmlu" and s == "test" for p, _, s in mm)
    assert hub_sources("winogrande") == [("allenai/winogrande", "winogrande_xl", "validation")]


def test_suite_neox_tokenizer_resolution(monkeypatch, tmp_path, clean_env, shared):
    """Never a relative ../shared path: $SPECTRA_TOKENIZER, the user cache, the HF cache, else a trained BPE."""
    from spectra.suite import neox_tokenizer

    monkeypatch.delenv("SPECTRA_TOKENIZER", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    logs = []
    assert neox_tokenizer(logs.append) is None and "training a byte-level BPE" in logs[0]
    cached = clean_env / "tokenizers" / "gpt-neox-20b.json"
    cached.parent.mkdir(parents=True)
    shutil.copy(shared("tokenizer", "gpt-neox-20b.json"), cached)
    assert neox_tokenizer(logs.append) == str(cached)
    monkeypatch.setenv("SPECTRA_TOKENIZER", str(tmp_path / "nope.json"))
    with pytest.raises(SpectraError, match="SPECTRA_TOKENIZER='.*nope.json' is not a file"):
        neox_tokenizer(logs.append)


def test_suite_hub_failure_recorded_and_not_retried(monkeypatch, tmp_path, clean_env):
    import spectra.eval as E
    from spectra.suite import Suite, make_plan

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def fake_evaluate(path, tasks=None, task_data=None, **kw):
        calls.append(tasks)
        if tasks:
            raise SpectraError("no network or Hugging Face cache for the hub datasets")
        return {"val_loss": 2.0, "skipped": {}}

    monkeypatch.setattr(E, "evaluate", fake_evaluate)
    s = Suite(make_plan("tiny", ["tiny1"]), tmp_path / "s", progress=False)
    (tmp_path / "s" / "eval").mkdir(parents=True)
    r1 = s.eval_one("floatlm-tiny1", tmp_path, "floatlm", "tiny1")
    r2 = s.eval_one("trilm-tiny1", tmp_path, "trilm", "tiny1")
    assert calls == [",".join(T.SPECTRA6), None, None]  # the Hub is tried once, not per model
    assert r1["tasks_skipped"]["piqa"].startswith("Hub datasets unavailable: no network")
    assert r2["tasks_skipped"] == r1["tasks_skipped"] and r1["val_loss"] == 2.0
    res = json.loads((tmp_path / "s" / "eval" / "trilm-tiny1.json").read_text())
    assert set(res["skipped"]) == set(T.SPECTRA6)
