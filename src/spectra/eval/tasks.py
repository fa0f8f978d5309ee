"""Task groups (spectra6 / spectra13) and local-data task configs for lm-eval.

We never rewrite a task: a local task is lm-eval's own YAML pulled in with
``include:`` plus dataset overrides (``dataset_path: json`` and ``data_files``
pointing at a local JSON Lines file in the Hugging Face schema), written to a
temporary directory that lm-eval's ``TaskManager(include_path=...)`` reads; the
overriding task keeps lm-eval's task name, prompts, metrics and version.

Where local task data comes from (:func:`resolve_task_data`, first found wins):
``--task-data DIR``, the environment variable ``SPECTRA_TASK_DATA``, the user cache
``$SPECTRA_HOME/tasks`` (default ``~/.cache/spectra/tasks``, filled by ``spectra tasks
fetch``), else lm-eval loads its Hub datasets itself.

Local layout: one file per task, see :data:`LOCAL`. Two tasks need a conversion, done
here and recorded in the results:

* winogrande: ``winogrande_hf_reconstructed.jsonl`` (the HF schema); the other file
  in the shared pack uses llm-foundry's expanded schema and is not used.
* crows_pairs_english: the shared ``crows_pairs_english.csv`` is the *original*
  CrowS-Pairs release; its ``sent_more``/``sent_less``/``bias_type`` columns are the
  ones lm-eval's task reads, so the CSV is converted to JSONL. Some sentences differ
  from the revised set lm-eval uses on the hub, so scores are close, not identical.
* mmlu_continuation: one ``mmlu/mmlu.jsonl`` with a ``subject`` field is split into
  the 57 per-subject files of lm-eval's per-subject tasks.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from spectra.errors import SpectraError, closest

SPECTRA6 = ["arc_challenge", "arc_easy", "hellaswag", "piqa", "boolq", "winogrande"]
SPECTRA13 = SPECTRA6 + ["lambada_openai", "sciq", "logiqa", "mmlu_continuation", "triviaqa",
                        "crows_pairs_english", "truthfulqa_mc1"]
GROUPS = {"spectra6": SPECTRA6, "spectra13": SPECTRA13}
# The headline metric of each 6-task-average task (SPEC.md, "Evaluation").
SIX_TASK_METRIC = {"arc_challenge": "acc_norm", "arc_easy": "acc_norm", "hellaswag": "acc_norm",
                   "piqa": "acc_norm", "boolq": "acc", "winogrande": "acc"}


@dataclass(frozen=True)
class LocalTask:
    files: tuple[str, ...]  # accepted file names under --task-data (first found wins)
    yaml: str  # lm-eval's YAML, relative to lm_eval/tasks
    split: str  # the split the file provides (the one the task evaluates on)
    keys: tuple[str, ...]  # required keys of every row (HF schema)
    schema: str  # for error messages


LOCAL: dict[str, LocalTask] = {
    "arc_easy": LocalTask(("arc_easy.jsonl",), "arc/arc_easy.yaml", "test", ("question", "choices", "answerKey"),
                          "{id, question, choices:{text:[..], label:[..]}, answerKey} (allenai/ai2_arc ARC-Easy test)"),
    "arc_challenge": LocalTask(("arc_challenge.jsonl",), "arc/arc_challenge.yaml", "test", ("question", "choices", "answerKey"),
                               "{id, question, choices:{text:[..], label:[..]}, answerKey} (allenai/ai2_arc ARC-Challenge test)"),
    "hellaswag": LocalTask(("hellaswag.jsonl",), "hellaswag/hellaswag.yaml", "validation",
                           ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                           "{activity_label, ctx_a, ctx_b, ctx, endings:[4 str], label:str} (Rowan/hellaswag validation)"),
    "piqa": LocalTask(("piqa.jsonl",), "piqa/piqa.yaml", "validation", ("goal", "sol1", "sol2", "label"),
                      "{goal, sol1, sol2, label:int} (piqa validation)"),
    "boolq": LocalTask(("boolq.jsonl",), "super_glue/boolq/default.yaml", "validation", ("question", "passage", "label"),
                       "{question, passage, idx, label:int} (super_glue boolq validation)"),
    "winogrande": LocalTask(("winogrande_hf_reconstructed.jsonl", "winogrande_hf.jsonl"), "winogrande/default.yaml",
                            "validation", ("sentence", "option1", "option2", "answer"),
                            "{sentence, option1, option2, answer:'1'|'2'} (winogrande winogrande_xl validation)"),
    "lambada_openai": LocalTask(("lambada_openai.jsonl",), "lambada/lambada_openai.yaml", "test", ("text",),
                                "{text} (EleutherAI/lambada_openai test)"),
    "sciq": LocalTask(("sciq.jsonl",), "sciq/sciq.yaml", "test",
                      ("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer"),
                      "{question, distractor1..3, correct_answer, support} (allenai/sciq test)"),
    "logiqa": LocalTask(("logiqa.jsonl",), "logiqa/logiqa.yaml", "test", ("label", "context", "question", "options"),
                        "{label:'a'..'d', context, question, options:[4 str]} (EleutherAI/logiqa test)"),
    "truthfulqa_mc1": LocalTask(("truthfulqa_mc1.jsonl",), "truthfulqa/truthfulqa_mc1.yaml", "validation",
                                ("question", "mc1_targets"),
                                "{question, mc1_targets:{choices,labels}, ...} (truthful_qa multiple_choice validation)"),
    "triviaqa": LocalTask(("triviaqa.jsonl",), "triviaqa/default.yaml", "validation", ("question", "answer"),
                          "{question, answer:{aliases:[..], ...}} (mandarjoshi/trivia_qa rc.nocontext validation)"),
    "crows_pairs_english": LocalTask(("crows_pairs_english.jsonl", "crows_pairs_english.csv"),
                                     "crows_pairs/crows_pairs_english.yaml", "test",
                                     ("sent_more", "sent_less", "bias_type"),
                                     "{sent_more, sent_less, stereo_antistereo, bias_type} (JSONL), or the original "
                                     "CrowS-Pairs CSV with those columns"),
    "mmlu_continuation": LocalTask(("mmlu/mmlu.jsonl", "mmlu.jsonl"), "mmlu/continuation", "test",
                                   ("question", "subject", "choices", "answer"),
                                   "{question, subject, choices:[4 str], answer:int} (cais/mmlu all test)"),
}


ENV_TASK_DATA = "SPECTRA_TASK_DATA"


def spectra_home() -> Path:
    """The user cache root: ``$SPECTRA_HOME``, default ``~/.cache/spectra``."""
    return Path(os.environ.get("SPECTRA_HOME") or Path.home() / ".cache" / "spectra").expanduser()


def task_cache_dir() -> Path:
    return spectra_home() / "tasks"


def task_file(data_dir: str | Path, task: str) -> Path | None:
    """The file providing ``task`` under ``data_dir`` (first accepted name found), or None."""
    spec = LOCAL.get(task)
    if spec is None:
        return None
    return next((Path(data_dir) / f for f in spec.files if (Path(data_dir) / f).is_file()), None)


@dataclass(frozen=True)
class TaskData:
    path: Path | None  # None: lm-eval loads the Hub datasets itself
    source: str  # where it came from, for plans, logs and results


def resolve_task_data(explicit: str | Path | None = None, tasks: list[str] | None = None) -> TaskData:
    """Local task data in the documented order: ``explicit`` (--task-data), $SPECTRA_TASK_DATA,
    the user cache (used when it holds a file for at least one of ``tasks``), else None (Hub)."""
    if explicit:
        return TaskData(Path(explicit).expanduser(), "--task-data")
    other = [t for t in (tasks or []) if t not in LOCAL]
    if other:  # e.g. `--tasks mmlu`: only lm-eval's own loading knows it
        return TaskData(None, f"lm-eval Hub datasets ('{other[0]}' has no local layout)")
    env = os.environ.get(ENV_TASK_DATA, "").strip()
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise SpectraError(f"{ENV_TASK_DATA}='{env}' is not a directory; point it at task data "
                               "(`spectra tasks fetch --dir DIR`) or unset it")
        return TaskData(p, f"${ENV_TASK_DATA}")
    cache = task_cache_dir()
    wanted = tasks if tasks is not None else list(LOCAL)
    if cache.is_dir() and any(task_file(cache, t) for t in wanted):
        return TaskData(cache, "user cache")
    return TaskData(None, "lm-eval Hub datasets, downloaded at eval time (no local task data found)")


def task_status(tasks: list[str], td: TaskData) -> tuple[list[str], dict[str, str]]:
    """(tasks that will run, {task: why skipped}) for a plan, without reading the files."""
    if td.path is None:
        from spectra.store.hub import offline

        if offline() or os.environ.get("HF_DATASETS_OFFLINE", "").strip() in ("1", "true", "True", "yes"):
            why = ("no local task data (--task-data, $SPECTRA_TASK_DATA and the user cache "
                   f"{task_cache_dir()} are empty) and the Hub is offline; run `spectra tasks fetch` once online")
            return [], {t: why for t in tasks}
        return list(tasks), {}
    run, skipped = [], {}
    for t in tasks:
        if t not in LOCAL:
            skipped[t] = f"no local-data layout for '{t}' (local tasks: {', '.join(LOCAL)})"
        elif task_file(td.path, t) is None:
            skipped[t] = f"{td.path / LOCAL[t].files[0]} not found ({td.source}); `spectra tasks fetch --tasks {t}`"
        else:
            run.append(t)
    return run, skipped


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def expand_tasks(spec: str | list[str]) -> list[str]:
    """'spectra6' | 'spectra13' | 'arc_easy,piqa' | list -> task names (order kept, no repeats)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for it in (s.strip() for s in items):
        if not it:
            continue
        for t in GROUPS.get(it, [it]):
            if t not in out:
                out.append(t)
    if not out:
        raise SpectraError("no tasks given; use spectra6, spectra13 or a comma-separated list of lm-eval task names")
    return out


def check_local(tasks: list[str]) -> None:
    """With --task-data only the tasks with a local layout can run; name them if another is asked."""
    for t in tasks:
        if t not in LOCAL:
            raise SpectraError(
                f"unknown task '{t}'{closest(t, list(LOCAL) + list(GROUPS))} for local data; tasks with a local "
                f"layout: {', '.join(LOCAL)}; groups: spectra6, spectra13 (without --task-data any lm-eval task "
                f"name works: `python -m spectra.harness ls tasks`)")


def check_known(tasks: list[str], task_manager) -> None:
    known = set(task_manager.all_tasks)
    for t in tasks:
        if t not in known:
            hint = closest(t, list(known) + list(GROUPS))
            raise SpectraError(
                f"unknown task '{t}'{hint}; groups: spectra6 ({', '.join(SPECTRA6)}), spectra13 (+ "
                f"{', '.join(SPECTRA13[6:])}); any lm-eval task name also works (list them with "
                f"`python -m spectra.harness ls tasks`)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_jsonl(path: Path, keys: tuple[str, ...], schema: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpectraError(f"{path}: line {n} is not valid JSON ({e.msg}); expected one object per line: {schema}") from None
            if not isinstance(row, dict):
                raise SpectraError(f"{path}: line {n} is not a JSON object; expected {schema}")
            missing = [k for k in keys if k not in row]
            if missing:
                raise SpectraError(f"{path}: line {n} lacks key '{missing[0]}'; expected rows {schema}")
            rows.append(row)
    if not rows:
        raise SpectraError(f"{path}: no rows; expected JSON Lines {schema}")
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _crows_csv_to_jsonl(src: Path, dst: Path, spec: LocalTask) -> int:
    with open(src, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [k for k in spec.keys if k not in cols]
        if missing:
            raise SpectraError(f"{src}: CSV lacks column '{missing[0]}'; expected {spec.schema}")
        rows = [{"sent_more": r["sent_more"], "sent_less": r["sent_less"],
                 "stereo_antistereo": r.get("stereo_antistereo", ""), "bias_type": r["bias_type"]} for r in reader]
    if not rows:
        raise SpectraError(f"{src}: no rows")
    _write_jsonl(dst, rows)
    return len(rows)


def _task_yaml(include: Path, task: str, split: str, data_file: Path, extra: dict | None = None) -> str:
    # JSON is valid YAML: no quoting pitfalls with paths.
    cfg = {"include": str(include), "task": task, "dataset_path": "json", "dataset_name": None,
           "dataset_kwargs": {"data_files": {split: str(data_file)}},
           "training_split": None, "fewshot_split": None,
           "validation_split": split if split == "validation" else None,
           "test_split": split if split == "test" else None, **(extra or {})}
    return json.dumps(cfg, indent=1) + "\n"


@dataclass
class LocalSetup:
    include_dir: Path
    tasks: list[str]  # tasks that will run
    fingerprints: dict[str, dict]  # task -> {file, sha256, rows}
    skipped: dict[str, str]  # task -> reason
    notes: dict[str, str]  # task -> caveat on the data


def write_local_tasks(tasks: list[str], data_dir: str | Path, out_dir: str | Path,
                      explicit: set[str] | None = None) -> LocalSetup:
    """Write include-YAMLs for ``tasks`` pointing at ``data_dir``.

    A task named explicitly (``explicit``) whose file is missing is an error naming the
    expected file and schema; a task that only came in through a group is skipped with
    the reason recorded.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise SpectraError(f"--task-data '{data_dir}' is not a directory (expected the layout `spectra tasks fetch` "
                           "writes; docs/evaluation.md)")
    explicit = set(tasks) if explicit is None else explicit
    out_dir.mkdir(parents=True, exist_ok=True)
    ltasks = lm_eval_tasks_dir()
    run, fps, skipped, notes = [], {}, {}, {}
    for t in tasks:
        spec = LOCAL.get(t)
        if spec is None:
            raise SpectraError(f"task '{t}' has no local-data layout; known local tasks: {', '.join(LOCAL)} "
                               f"(run without --task-data to use the hub dataset)")
        src = task_file(data_dir, t)
        if src is None:
            msg = (f"{data_dir / spec.files[0]} not found; expected JSON Lines rows {spec.schema} "
                   f"(`spectra tasks fetch --tasks {t} --dir {data_dir}` downloads it)")
            if t in explicit:
                raise SpectraError(f"task '{t}': {msg}")
            skipped[t] = f"no local data: {msg}"
            continue
        if t == "crows_pairs_english":  # noqa: SIM114
            if src.suffix == ".csv":
                conv = out_dir / "data" / "crows_pairs_english.jsonl"
                conv.parent.mkdir(exist_ok=True)
                nrows = _crows_csv_to_jsonl(src, conv, spec)
                notes[t] = ("original CrowS-Pairs CSV (1508 pairs) converted to lm-eval's columns; lm-eval's hub "
                            "dataset is the revised BigScience version, so scores are close but not identical")
                data = conv
            else:
                nrows = len(_read_jsonl(src, spec.keys, spec.schema))
                data = src
            (out_dir / f"{t}.yaml").write_text(_task_yaml(ltasks / spec.yaml, t, spec.split, data))
        elif t == "mmlu_continuation":
            rows = _read_jsonl(src, spec.keys, spec.schema)
            nrows = len(rows)
            by_subj: dict[str, list[dict]] = {}
            for r in rows:
                by_subj.setdefault(r["subject"], []).append(r)
            cont = ltasks / "mmlu" / "continuation"
            known = sorted(p.stem.removeprefix("mmlu_") for p in cont.glob("mmlu_*.yaml"))
            missing = [s for s in known if s not in by_subj]
            if missing:
                raise SpectraError(f"{src}: no rows for MMLU subject '{missing[0]}' ({len(missing)} of {len(known)} "
                                   f"subjects missing); expected all 57 subjects in the 'subject' field")
            (out_dir / "data").mkdir(exist_ok=True)
            # lm-eval's group definition, verbatim: it collects the subject tasks by their tags
            (out_dir / "_mmlu_continuation_group.yaml").write_text((cont / "_mmlu.yaml").read_text())
            for s in known:
                f = out_dir / "data" / f"mmlu_{s}.jsonl"
                _write_jsonl(f, by_subj[s])
                (out_dir / f"mmlu_{s}_continuation.yaml").write_text(
                    _task_yaml(cont / f"mmlu_{s}.yaml", f"mmlu_{s}_continuation", "test", f))
        else:
            nrows = len(_read_jsonl(src, spec.keys, spec.schema))
            (out_dir / f"{t}.yaml").write_text(_task_yaml(ltasks / spec.yaml, t, spec.split, src))
            if t == "hellaswag":
                notes[t] = "shared hellaswag.jsonl is approximate (ctx_b folded into ctx_a); see data README"
            if t == "winogrande" and src.name.startswith("winogrande_hf_reconstructed"):
                notes[t] = "HF-schema winogrande reconstructed from llm-foundry rows; lm-eval's choices/targets match exactly"
        fps[t] = {"file": str(src.resolve()), "sha256": sha256_file(src), "rows": nrows}
        run.append(t)
    return LocalSetup(out_dir, run, fps, skipped, notes)


def offline_env() -> None:
    """Local evaluation never touches the network (NOTES.md: lm-eval offline)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
