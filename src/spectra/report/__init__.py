"""`spectra report`: tables, scaling-law fits and plots from finished runs.

``write_report(paths, out_dir)`` gathers :class:`ModelRecord` s (see collect.py),
fits L(N) = A/N^alpha + eps per family, draws the figures and writes
``report.md``, ``report.html`` (self-contained: plots embedded, sortable tables),
``results.csv`` and ``results.json`` next to the PNGs.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from spectra.fsutil import atomic_write_json, atomic_write_text
from spectra.report import html, plots
from spectra.report.collect import FAMILY_LABEL, FAMILY_ORDER, ModelRecord, average_seeds, load_records
from spectra.report.scaling import PowerLawFit, fit_power_law

SIX = [("arc_challenge", "acc_norm"), ("arc_easy", "acc_norm"), ("hellaswag", "acc_norm"), ("piqa", "acc_norm"),
       ("boolq", "acc"), ("winogrande", "acc")]


def fit_families(recs: list[ModelRecord]) -> tuple[dict[str, PowerLawFit], dict[str, str]]:
    """Per-family fits of final validation loss vs parameters (families with >= 3 sizes)."""
    fits, notes = {}, {}
    for fam in FAMILY_ORDER:
        pts = sorted(((r.params, r.val_loss) for r in recs if r.family == fam and r.val_loss is not None and r.params))
        if len(pts) < 3:
            if pts:
                notes[fam] = f"{len(pts)} size(s): a 3-parameter law needs at least 3"
            continue
        try:
            fit = fit_power_law([p for p, _ in pts], [v for _, v in pts])
        except (RuntimeError, ValueError) as e:  # LM did not converge: say so in the report
            notes[fam] = f"fit failed: {e}"
            continue
        fits[fam] = fit
        if fit.alpha <= 0:
            notes[fam] = ("loss does not fall with size in these runs (α ≤ 0): the models are too briefly "
                          "trained for a scaling law; the fit is shown but not meaningful")
        elif len(pts) == 3:
            notes[fam] = "3 points for 3 parameters: the fit is exact and has no uncertainty"
    return fits, notes


def _fmt(v, nd=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = "| " + " | ".join(head) + " |\n|" + "|".join("---" for _ in head) + "|\n"
    return out + "".join("| " + " | ".join(r) + " |\n" for r in rows)


def _size_order(recs):
    sizes = {}
    for r in recs:
        if r.family in ("floatlm", "trilm"):
            sizes.setdefault(r.size, r.params)
        else:
            sizes.setdefault(r.size, r.params)
    return sorted(sizes, key=lambda s: sizes[s])


def markdown(recs: list[ModelRecord], fits: dict, notes: dict, figures: dict[str, Path], paper: bool,
             title: str = "Spectra suite report", preamble: str = "") -> str:
    fams = [f for f in FAMILY_ORDER if any(r.family == f for r in recs)]
    sizes = _size_order(recs)
    by = {(r.family, r.size): r for r in recs}
    md = [f"# {title}\n", preamble]
    md.append("## Models\n")
    md.append(_table(["model", "family", "size", "params", "non-emb", "size (Mbit)", "val loss", "val ppl", "6-task avg"],
                     [[r.id, FAMILY_LABEL.get(r.family, r.family), r.size, f"{r.params / 1e6:.2f}M",
                       f"{r.non_embedding / 1e6:.2f}M", f"{r.size_bits / 1e6:.2f}", _fmt(r.val_loss),
                       _fmt(r.val_ppl, 2), _fmt(r.six_task_avg, 1)]
                      for r in sorted(recs, key=lambda r: (sizes.index(r.size) if r.size in sizes else 0,
                                                            FAMILY_ORDER.index(r.family) if r.family in FAMILY_ORDER else 99))]))
    seeded = [r for r in recs if r.extra.get("seeds")]
    if seeded:
        md.append("\nQuantLM rows are means over calibration seeds (as in the paper); per seed:\n")
        md.append(_table(["model", "seeds", "val loss per seed", "std", "6-task avg per seed"],
                         [[r.id, str(len(r.extra["seeds"])),
                           ", ".join(_fmt(x["val_loss"]) for x in r.extra["seeds"]), _fmt(r.extra.get("val_loss_std"), 4),
                           ", ".join(_fmt(x["six_task_avg"], 1) for x in r.extra["seeds"])] for r in seeded]))
    md.append("\n## Validation perplexity by size and family (Table 7 layout)\n")
    md.append(_table(["size"] + [FAMILY_LABEL[f] for f in fams],
                     [[s] + [_fmt(by[(f, s)].val_ppl, 2) if (f, s) in by else "–" for f in fams] for s in sizes]))
    if any(r.six_task_avg is not None for r in recs):
        md.append("\n## 6-task average by size and family\n")
        md.append(_table(["size"] + [FAMILY_LABEL[f] for f in fams],
                         [[s] + [_fmt(by[(f, s)].six_task_avg, 1) if (f, s) in by else "–" for f in fams]
                          for s in sizes]))
        tasks = sorted({t for r in recs for t in r.tasks})
        if tasks:
            md.append("\n## Per-task metrics\n")
            rows = []
            for r in recs:
                if not r.tasks:
                    continue
                cells = []
                for t in tasks:
                    m = r.tasks.get(t, {})
                    key = dict(SIX).get(t, "acc_norm" if "acc_norm" in m else "acc")
                    val = m.get(key, m.get("acc", m.get("word_perplexity")))
                    cells.append(_fmt(val * 100 if isinstance(val, float) and key.startswith("acc") else val, 1))
                rows.append([r.id] + cells)
            md.append(_table(["model"] + tasks, rows))
    md.extend(skipped_tasks_section(recs))
    md.append("\n## Scaling law: final validation loss L(N) = A / N^α + ε\n")
    if fits:
        md.append(_table(["family", "A", "α", "ε", "points", "rmse"],
                         [[FAMILY_LABEL[f], f"{x.A:.4g} ± {x.A_err:.2g}", f"{x.alpha:.4f} ± {x.alpha_err:.2g}",
                           f"{x.eps:.4f} ± {x.eps_err:.2g}", str(x.n_points), f"{x.rmse:.3g}"] for f, x in fits.items()]))
    for fam, note in notes.items():
        md.append(f"- {FAMILY_LABEL.get(fam, fam)}: {note}\n")
    if paper:
        from spectra.report.paper import SCALING

        md.append("\nPaper (300B tokens, SlimPajama, NeoX tokenizer): "
                  + "; ".join(f"{FAMILY_LABEL[f]} A={v['A']}, α={v['alpha']}, ε={v['eps']}" for f, v in SCALING.items())
                  + ". Losses from a different tokenizer/corpus are not directly comparable; the plots show both.\n")
    packed = [r for r in recs if r.extra.get("packed")]
    if packed:
        md.append("\n## Packed TriLMs (native CPU engine)\n")
        md.append(_table(["model", "format", "packed size (MB)", "val loss (PyTorch)", "val loss (packed engine)"],
                         [[r.id, r.extra["packed"]["format"], f"{r.extra['packed']['bytes'] / 1e6:.2f}",
                           _fmt(r.val_loss, 4), _fmt(r.extra["packed"]["val_loss"], 4)] for r in packed]))
        md.append("\nThe packed engine quantizes activations to 8 bits, so its loss differs slightly.\n")
    gap = trilm_gap(recs)
    if gap:
        md.append("\n## TriLM vs FloatLM gap (final validation loss)\n")
        md.append(_table(["size", "params", "FloatLM", "TriLM", "gap"],
                         [[s, f"{p / 1e6:.2f}M", _fmt(f), _fmt(t), _fmt(t - f)] for s, p, f, t in gap]))
        diffs = [t - f for _, _, f, t in gap]
        if len(diffs) >= 2:
            shrinking = all(b <= a for a, b in zip(diffs, diffs[1:]))
            md.append(f"\nThe gap {'shrinks' if shrinking else 'does not shrink monotonically'} with size "
                      f"({' → '.join(f'{d:.3f}' for d in diffs)}).\n")
    if figures:
        md.append("\n## Figures\n")
        for name, p in figures.items():
            md.append(f"\n### {name}\n\n![{name}]({p.name})\n")
    return "\n".join(md)


def skipped_tasks_section(recs: list[ModelRecord]) -> list[str]:
    """lm-eval tasks that did not run, with the reason (never a silent '–' column)."""
    why: dict[str, dict[str, list[str]]] = {}  # reason -> task -> models
    for r in recs:
        for t, reason in (r.extra.get("tasks_skipped") or {}).items():
            why.setdefault(reason, {}).setdefault(t, []).append(r.id)
    if not why:
        return []
    out = ["\n## lm-eval tasks not run\n"]
    if not any(r.six_task_avg is not None for r in recs):
        out.append("No 6-task average: the tasks below did not run.\n")
    for reason, tasks in why.items():
        models = sorted({m for ms in tasks.values() for m in ms})
        scope = "all models" if len(models) == len(recs) else ", ".join(models)
        out.append(f"- {', '.join(tasks)} ({scope}): {reason}\n")
    return out


def trilm_gap(recs):
    fl = {r.size: r for r in recs if r.family == "floatlm" and r.val_loss is not None}
    tr = {r.size: r for r in recs if r.family == "trilm" and r.val_loss is not None}
    rows = [(s, fl[s].params, fl[s].val_loss, tr[s].val_loss) for s in fl if s in tr]
    return sorted(rows, key=lambda x: x[1])


def write_csv(recs: list[ModelRecord], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "family", "size", "params", "non_embedding", "size_bits", "val_loss", "val_ppl", "six_task_avg"])
    for r in recs:
        w.writerow([r.id, r.family, r.size, r.params, r.non_embedding, f"{r.size_bits:.0f}",
                    "" if r.val_loss is None else f"{r.val_loss:.6f}", "" if r.val_ppl is None else f"{r.val_ppl:.4f}",
                    "" if r.six_task_avg is None else f"{r.six_task_avg:.4f}"])
    atomic_write_text(path, buf.getvalue())


def write_report(paths: list, out_dir: str | Path, paper: bool = False, title: str = "Spectra suite report",
                 preamble: str = "", records: list[ModelRecord] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = average_seeds(records if records is not None else load_records(paths))
    fits, notes = fit_families(recs)
    figs: dict[str, Path] = {}
    for name, fn in [
        ("Training and validation loss vs tokens", lambda: plots.loss_curves(recs, out / "loss_curves.png")),
        ("Validation loss vs parameters", lambda: plots.scaling(recs, fits, out / "scaling_params.png", "params", paper)),
        ("Validation loss vs size in bits", lambda: plots.scaling(recs, fits, out / "scaling_bits.png", "size_bits", paper)),
        ("Validation perplexity vs size in bits", lambda: plots.score_vs_bits(recs, out / "ppl_vs_bits.png", "val_ppl")),
        ("6-task average vs size in bits", lambda: plots.score_vs_bits(recs, out / "score_vs_bits.png", "six_task_avg", paper)),
        ("Validation loss across checkpoints", lambda: plots.checkpoint_curves(recs, out / "checkpoints_val_loss.png", "val_loss")),
        ("6-task average across checkpoints", lambda: plots.checkpoint_curves(recs, out / "checkpoints_six_task.png", "six_task_avg")),
    ]:
        p = fn()
        if p is not None:
            figs[name] = p
    if paper:
        p = plots.checkpoint_curves(recs, out / "checkpoints_val_ppl.png", "val_ppl", paper=True)
        if p is not None:
            figs["Validation perplexity across checkpoints (with the paper's TriLM)"] = p
    atomic_write_json(out / "results.json", {"models": [r.to_dict() for r in recs],
                                             "fits": {f: x.to_dict() for f, x in fits.items()}, "fit_notes": notes})
    write_csv(recs, out / "results.csv")
    md = markdown(recs, fits, notes, figs, paper, title, preamble)
    atomic_write_text(out / "report.md", md)
    html.write_html(md, out / "report.html", title)  # the same content, self-contained (plots embedded)
    return out / "report.md"
