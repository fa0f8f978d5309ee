"""`spectra tasks fetch` / `list`: evaluation sets from the Hub into the local task layout.

Each task's source is read from lm-eval's own task YAML (``dataset_path``,
``dataset_name``, following ``include:``), so we download exactly the Hugging Face
dataset lm-eval would, through ``datasets.load_dataset``, and write the split the
task scores on as JSON Lines in the Hub schema: the layout :mod:`spectra.eval.tasks`
reads (``--task-data`` / ``$SPECTRA_TASK_DATA`` / the user cache). A
``manifest.json`` records per file its source, row count and sha256;
``spectra tasks list`` re-hashes the files against it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from spectra.errors import SpectraError
from spectra.eval.tasks import LOCAL, expand_tasks, lm_eval_tasks_dir, sha256_file, task_file

MANIFEST = "manifest.json"


def _yaml_load(path: Path) -> dict:
    """lm-eval task YAML as a dict; ``!function`` and other custom tags read as None (we only need
    the dataset fields), ``include:`` merged in (the including file wins), as lm-eval does."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader) or {}
    inc = cfg.pop("include", None)
    if inc:
        base = _yaml_load((path.parent / inc) if not Path(inc).is_absolute() else Path(inc))
        cfg = {**base, **cfg}
    return cfg


def hub_sources(task: str) -> list[tuple[str, str | None, str]]:
    """[(dataset_path, dataset_name, split)] that lm-eval loads for ``task`` (mmlu: one per subject)."""
    spec = LOCAL[task]
    root = lm_eval_tasks_dir()
    if task == "mmlu_continuation":
        files = sorted((root / spec.yaml).glob("mmlu_*.yaml"))
        out = []
        for f in files:
            cfg = _yaml_load(f)
            out.append((cfg["dataset_path"], cfg.get("dataset_name"), spec.split))
        return out
    cfg = _yaml_load(root / spec.yaml)
    if "dataset_path" not in cfg:
        raise SpectraError(f"lm-eval's {spec.yaml} names no dataset_path; this lm-eval version is not supported")
    return [(cfg["dataset_path"], cfg.get("dataset_name"), spec.split)]


def _jsonable(row: dict) -> dict:
    return json.loads(json.dumps(row, ensure_ascii=False, default=str))


def _rows(path: str, name: str | None, split: str) -> tuple[list[dict], str | None]:
    from datasets import load_dataset

    try:
        ds = load_dataset(path, name, split=split)
    except Exception as e:  # noqa: BLE001  (network, missing config, offline: one line for the user)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SpectraError(f"could not load Hub dataset {path}{f' ({name})' if name else ''} split {split}: "
                           f"{first}; check the network / HF_DATASETS_OFFLINE, or copy the files in by hand "
                           "(docs/evaluation.md)") from None
    return [_jsonable(dict(r)) for r in ds], getattr(ds, "_fingerprint", None)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from spectra.fsutil import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def fetch_task(task: str, out_dir: Path) -> dict:
    """Download one task and write its local file; returns its manifest entry."""
    spec = LOCAL[task]
    sources = hub_sources(task)
    rows: list[dict] = []
    fps = []
    for path, name, split in sources:
        part, fp = _rows(path, name, split)
        if task == "mmlu_continuation":
            for r in part:
                r.setdefault("subject", name)
        rows += part
        fps.append(fp)
    missing = next((k for k in spec.keys if rows and k not in rows[0]), None)
    if not rows or missing:
        raise SpectraError(f"Hub dataset for '{task}' gave {'no rows' if not rows else f'rows without {missing!r}'}; "
                           f"expected {spec.schema}")
    # the last accepted name is the plain Hub-schema one (winogrande: winogrande_hf.jsonl, not the reconstruction)
    rel = spec.files[-1] if task == "winogrande" else spec.files[0]
    if task == "crows_pairs_english":
        rel = "crows_pairs_english.jsonl"
    dst = out_dir / rel
    _write_jsonl(dst, rows)
    return {"file": rel, "rows": len(rows), "sha256": sha256_file(dst),
            "source": [{"dataset": p, "name": n, "split": s} for p, n, s in sources],
            "dataset_fingerprints": [f for f in fps if f][:3], "fetched": time.strftime("%Y-%m-%dT%H:%M:%S")}


def read_manifest(d: Path) -> dict:
    f = d / MANIFEST
    if not f.is_file():
        return {"tasks": {}}
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise SpectraError(f"{f}: not valid JSON ({e.msg}); delete it and run `spectra tasks fetch` again") from None
    if not isinstance(m, dict) or not isinstance(m.get("tasks"), dict):
        raise SpectraError(f"{f}: expected {{\"tasks\": {{...}}}}; delete it and run `spectra tasks fetch` again")
    return m


def fetch(tasks: str, out_dir: str | Path, log=print) -> dict:
    """Fetch ``tasks`` (group or list) into ``out_dir``; the manifest is updated after each task."""
    from spectra.fsutil import atomic_write_json

    names = expand_tasks(tasks)
    bad = [t for t in names if t not in LOCAL]
    if bad:
        raise SpectraError(f"task '{bad[0]}' has no local layout; fetchable tasks: {', '.join(LOCAL)} "
                           "(groups spectra6, spectra13)")
    try:
        import datasets
    except ImportError:
        raise SpectraError("spectra tasks fetch needs the 'datasets' package: pip install 'spectra-lm[eval]'") from None
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    man = read_manifest(out)
    man.update({"format": 1, "datasets_version": datasets.__version__})
    for t in names:
        t0 = time.perf_counter()
        entry = fetch_task(t, out)
        man["tasks"][t] = entry
        atomic_write_json(out / MANIFEST, man)  # a partial fetch keeps what finished
        log(f"{t:22s} {entry['rows']:7d} rows  {entry['file']}  ({time.perf_counter() - t0:.1f}s)")
    return man


def status(d: str | Path) -> list[dict]:
    """One row per known task: whether a file is present, its rows and whether it matches the manifest."""
    d = Path(d).expanduser()
    man = read_manifest(d) if d.is_dir() else {"tasks": {}}
    rows = []
    for t in LOCAL:
        f = task_file(d, t) if d.is_dir() else None
        e = man["tasks"].get(t)
        if f is None:
            rows.append({"task": t, "state": "missing", "rows": None, "file": None})
            continue
        rel = str(f.relative_to(d))
        if e and e.get("file") == rel:
            ok = sha256_file(f) == e.get("sha256")
            state = "ok" if ok else "CHANGED (sha256 differs from manifest)"
            rows.append({"task": t, "state": state, "rows": e.get("rows"), "file": rel})
        else:
            rows.append({"task": t, "state": "present (not fetched: no manifest entry)", "rows": None, "file": rel})
    return rows
