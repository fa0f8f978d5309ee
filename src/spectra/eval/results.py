"""Results JSON, the markdown table and the 6-task average.

The JSON is what ``spectra report`` reads to plot metrics across checkpoints::

    {"model": path, "family", "step", "tokens", "kind", "checkpoint_fingerprint",
     "tasks": {task: {metric: value, ..., "version": v, "n": samples}},
     "six_task_avg": float | None, "ppl": {file: {...}}, "val_loss": float | None,
     "data_fingerprints": {task: {file, sha256, rows}}, "skipped": {task: reason},
     "notes": {task: caveat}, "settings": {...}, "lm_eval_version", "created"}

Metric values are fractions in [0, 1] as lm-eval reports them; the table prints
percentages, as the paper does.
"""

from __future__ import annotations

import datetime as _dt
import math

from spectra.eval.tasks import SIX_TASK_METRIC, SPECTRA6

_SKIP = {"alias", "sample_len", "name"}


def _num(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return None if (isinstance(v, float) and math.isnan(v)) else float(v)
    return None


def task_metrics(lm_results: dict, task: str) -> dict:
    """{metric: value, metric_stderr: value, version, n} for one task of a simple_evaluate result."""
    raw = lm_results.get("results", {}).get(task, {})
    out: dict = {}
    for key, v in raw.items():
        if key in _SKIP:
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt in ("none", "") else f"{metric},{filt}"
        num = _num(v)
        if num is not None:
            out[name] = num
    ver = lm_results.get("versions", {}).get(task)
    if ver is not None:
        out["version"] = ver
    n = lm_results.get("n-samples", {}).get(task)
    if isinstance(n, dict):
        out["n"] = n.get("effective", n.get("original"))
    return out


def six_task_average(tasks: dict) -> float | None:
    """Mean of acc_norm (ARC-C, ARC-E, HellaSwag, PIQA) and acc (BoolQ, WinoGrande); None if any is missing."""
    vals = []
    for t in SPECTRA6:
        v = tasks.get(t, {}).get(SIX_TASK_METRIC[t])
        if v is None:
            return None
        vals.append(v)
    return sum(vals) / len(vals)


def build(model_info: dict, lm_results: dict | None, tasks: list[str], *, fingerprints=None, skipped=None,
          notes=None, settings=None, ppl=None, val_loss=None) -> dict:
    import lm_eval

    per_task = {t: task_metrics(lm_results, t) for t in tasks} if lm_results else {}
    return {
        **model_info,
        "tasks": per_task,
        "six_task_avg": six_task_average(per_task),
        "ppl": ppl or {},
        "val_loss": val_loss,
        "data_fingerprints": fingerprints or {},
        "skipped": skipped or {},
        "notes": notes or {},
        "settings": settings or {},
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def markdown(res: dict) -> str:
    """Task table (headline metric first, other metrics after) + the 6-task average + perplexities."""
    lines = []
    title = res.get("model") or "model"
    meta = ", ".join(f"{k}={res[k]}" for k in ("family", "step", "tokens") if res.get(k) is not None)
    lines.append(f"### {title}" + (f" ({meta})" if meta else ""))
    if res.get("tasks"):
        lines += ["", "| task | version | n | metric | value (%) | ± stderr | other metrics |",
                  "|---|---|---|---|---|---|---|"]
        for t, m in res["tasks"].items():
            head = SIX_TASK_METRIC.get(t) or next((k for k in ("acc_norm", "acc", "exact_match", "pct_stereotype",
                                                                "likelihood_diff") if k in m), None)
            if head is None:
                head = next((k for k in m if not k.endswith("_stderr") and k not in ("version", "n")), "")
            others = []
            for k, v in m.items():
                if k in (head, f"{head}_stderr", "version", "n") or k.endswith("_stderr"):
                    continue
                others.append(f"{k} {v:.4g}" if k in ("perplexity", "likelihood_diff") else f"{k} {_pct(v)}")
            val = m.get(head)
            fmt = (f"{val:.4g}" if head in ("perplexity", "likelihood_diff") else _pct(val)) if val is not None else "n/a"
            se = m.get(f"{head}_stderr")
            lines.append(f"| {t} | {m.get('version', '')} | {m.get('n', '')} | {head} | {fmt} | "
                         f"{'' if se is None else _pct(se)} | {'; '.join(others)} |")
        avg = res.get("six_task_avg")
        lines.append("")
        lines.append(f"**6-task average** (acc_norm: ARC-C, ARC-E, HellaSwag, PIQA; acc: BoolQ, WinoGrande): "
                     + (f"**{100 * avg:.2f}**" if avg is not None else "n/a (needs all six spectra6 tasks)"))
    if res.get("ppl"):
        lines += ["", "| text | tokens | bytes | NLL/token | perplexity | bits/byte |", "|---|---|---|---|---|---|"]
        for f, p in res["ppl"].items():
            lines.append(f"| {f} | {p['tokens']} | {p['bytes']} | {p['nll_per_token']:.4f} | {p['ppl']:.3f} | "
                         f"{p['bits_per_byte']:.4f} |")
    if res.get("val_loss") is not None:
        lines += ["", f"validation loss: {res['val_loss']:.4f} (ppl {math.exp(res['val_loss']):.3f})"]
    for t, why in (res.get("skipped") or {}).items():
        lines.append(f"- skipped {t}: {why}")
    for t, why in (res.get("notes") or {}).items():
        lines.append(f"- note {t}: {why}")
    return "\n".join(lines) + "\n"
