"""Gather model results from suite directories, training runs and eval result files.

Everything is normalised into :class:`ModelRecord` so the tables and plots never
care where a number came from. Sources:

* a suite directory (``suite.json`` + the ``models.json`` index of :mod:`spectra.store.runs`);
* a training run directory (layout: :mod:`spectra.store.runs`);
* an eval results JSON written by ``spectra eval`` (``{"model", "family", "tasks", ...}``).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spectra.errors import SpectraError

FAMILY_ORDER = ["floatlm", "q8", "q6", "q4", "q3", "trilm", "bilm"]
FAMILY_LABEL = {"floatlm": "FloatLM", "q8": "QuantLM 8", "q6": "QuantLM 6", "q4": "QuantLM 4",
                "q3": "QuantLM 3", "trilm": "TriLM", "bilm": "BiLM"}


@dataclass
class ModelRecord:
    id: str
    family: str  # floatlm | trilm | bilm | q8 | q6 | q4 | q3
    size: str  # size label (preset name)
    params: int = 0
    non_embedding: int = 0
    size_bits: float = 0.0
    val_loss: float | None = None
    six_task_avg: float | None = None
    tasks: dict = field(default_factory=dict)  # task -> {metric: value}
    ppl: dict = field(default_factory=dict)
    curve: dict = field(default_factory=dict)  # {"tokens": [...], "loss": [...]}
    val_curve: dict = field(default_factory=dict)  # {"tokens": [...], "val_loss": [...]}
    checkpoints: list = field(default_factory=list)  # [{"step", "tokens", "val_loss", "six_task_avg", ...}]
    extra: dict = field(default_factory=dict)  # method, bits, seeds, ...

    @property
    def val_ppl(self) -> float | None:
        return math.exp(self.val_loss) if self.val_loss is not None else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["val_ppl"] = self.val_ppl
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelRecord":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**d)


def curves_from_metrics(run: Path) -> tuple[dict, dict]:
    """(train curve, validation curve) from a training run's metrics."""
    from spectra.store import read_metrics

    train_t, train_l, val_t, val_l = [], [], [], []
    for r in read_metrics(run):
        tok = r.get("tokens")
        if tok is None:
            continue
        if r.get("loss") is not None and math.isfinite(r["loss"]):
            train_t.append(tok)
            train_l.append(r["loss"])
        if r.get("val_loss") is not None:
            val_t.append(tok)
            val_l.append(r["val_loss"])
    # A resumed run may log some steps twice: keep the last value per token count.
    def dedupe(t, v):
        d = dict(zip(t, v))
        ks = sorted(d)
        return ks, [d[k] for k in ks]
    tt, tl = dedupe(train_t, train_l)
    vt, vl = dedupe(val_t, val_l)
    return {"tokens": tt, "loss": tl}, {"tokens": vt, "val_loss": vl}


def model_sizes(model_dir: Path, family: str) -> tuple[int, int, float]:
    """(params, non-embedding params, size in bits) of a model directory, from its config only."""
    from spectra.sizes import size_bits
    from spectra.model import build_meta, param_counts
    from spectra.store import read_model_config

    cfg, _ = read_model_config(model_dir)
    c = param_counts(build_meta(cfg))
    return c["total"], c["non_embedding"], size_bits(c, family, cfg)


def eval_into(rec: ModelRecord, res: dict) -> None:
    """Merge a `spectra eval` results dict into a record."""
    if res.get("tasks"):
        rec.tasks.update(res["tasks"])
    if res.get("six_task_avg") is not None:
        # `spectra eval` stores lm-eval's fractions; the paper's tables (and ours) use percent
        rec.six_task_avg = 100.0 * res["six_task_avg"]
    if res.get("val_loss") is not None:
        rec.val_loss = res["val_loss"]
    if res.get("ppl"):
        rec.ppl.update(res["ppl"])


def _finite(xs: list) -> list[float]:
    return [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]


def _mean(xs: list) -> float | None:
    xs = _finite(xs)
    return statistics.fmean(xs) if xs else None


def _std(xs: list) -> float | None:
    """Sample standard deviation; None below two values."""
    xs = _finite(xs)
    return statistics.stdev(xs) if len(xs) >= 2 else None


def average_seeds(recs: list[ModelRecord]) -> list[ModelRecord]:
    """One record per (QuantLM family, size): the mean over its calibration seeds, as the paper reports.

    QuantLM records of the same family and size (one per GPTQ calibration seed) become one
    record whose validation loss, 6-task average and per-task metrics are seed means; the
    per-seed values and the sample standard deviations go to ``extra["seeds"]`` /
    ``extra["val_loss_std"]`` / ``extra["six_task_std"]``. Other records pass unchanged,
    in their original order.
    """
    groups: dict[tuple[str, str], list[ModelRecord]] = {}
    for r in recs:
        if r.family.startswith("q"):
            groups.setdefault((r.family, r.size), []).append(r)
    out, seen = [], set()
    for r in recs:
        key = (r.family, r.size)
        if key not in groups or len(groups[key]) == 1:
            out.append(r)
            continue
        if key in seen:
            continue
        seen.add(key)
        g = groups[key]
        base = g[0]
        m = ModelRecord(id=f"{r.family}-{r.size}", family=r.family, size=r.size, params=base.params,
                        non_embedding=base.non_embedding, size_bits=base.size_bits,
                        val_loss=_mean([x.val_loss for x in g]), six_task_avg=_mean([x.six_task_avg for x in g]),
                        extra={**base.extra})
        for task in sorted({t for x in g for t in x.tasks}):
            metrics = sorted({k for x in g for k in x.tasks.get(task, {})})
            vals = {k: _mean([x.tasks.get(task, {}).get(k) for x in g]) for k in metrics}
            m.tasks[task] = {k: v for k, v in vals.items() if v is not None}
        for name in sorted({p for x in g for p in x.ppl}):
            v = _mean([x.ppl.get(name) for x in g])
            if v is not None:
                m.ppl[name] = v
        m.extra["seeds"] = [{"id": x.id, "val_loss": x.val_loss, "six_task_avg": x.six_task_avg} for x in g]
        m.extra["val_loss_std"] = _std([x.val_loss for x in g])
        m.extra["six_task_std"] = _std([x.six_task_avg for x in g])
        out.append(m)
    return out


def load_records(paths: list[str | Path]) -> list[ModelRecord]:
    from spectra.store import is_run_dir, is_suite_dir, read_suite_index

    recs: list[ModelRecord] = []
    for p in map(Path, paths):
        if not p.exists():
            raise SpectraError(f"'{p}' does not exist")
        if is_suite_dir(p):
            recs += [ModelRecord.from_dict(d) for d in read_suite_index(p)]
        elif is_run_dir(p):
            recs.append(record_from_run(p))
        elif p.is_file() and p.suffix == ".json":
            res = json.loads(p.read_text())
            fam = res.get("family", "floatlm")
            rec = ModelRecord(id=p.stem, family=fam, size=str(res.get("size", p.stem)))
            model = Path(res.get("model", ""))
            if model.is_dir() and (model / "config.json").exists():
                rec.params, rec.non_embedding, rec.size_bits = model_sizes(model, fam)
            eval_into(rec, res)
            recs.append(rec)
        else:
            raise SpectraError(f"'{p}' is not a suite directory (models.json), a training run (metrics.jsonl) "
                               "or a results JSON from `spectra eval`")
    return recs


def record_from_run(run: Path, family: str | None = None, size: str | None = None) -> ModelRecord:
    """A record from a training run directory (curves + the final checkpoint's shape)."""
    from spectra.store import final_model, read_config

    curve, val_curve = curves_from_metrics(run)
    final = final_model(run)  # RUN/final, else the newest *complete* checkpoint
    meta = {}
    if final is not None:
        meta = read_config(final).get("spectra", {})
    family = family or meta.get("family", "floatlm")
    rec = ModelRecord(id=run.name, family=family, size=size or str(meta.get("preset", run.name)),
                      curve=curve, val_curve=val_curve)
    if final is not None:
        rec.params, rec.non_embedding, rec.size_bits = model_sizes(final, family)
    if val_curve["val_loss"]:
        rec.val_loss = val_curve["val_loss"][-1]
    return rec
