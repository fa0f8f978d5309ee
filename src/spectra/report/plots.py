"""Matplotlib figures for the report (PNG, written next to the CSV/JSON they show)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spectra.report.collect import FAMILY_LABEL, FAMILY_ORDER, ModelRecord

COLORS = {"floatlm": "#1f77b4", "q8": "#17becf", "q6": "#2ca02c", "q4": "#bcbd22", "q3": "#ff7f0e",
          "trilm": "#d62728", "bilm": "#9467bd"}
MARKERS = {"floatlm": "o", "q8": "v", "q6": "^", "q4": "s", "q3": "D", "trilm": "*", "bilm": "P"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from spectra.fsutil import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    _plt().close(fig)
    return path


def loss_curves(recs: list[ModelRecord], path: Path) -> Path | None:
    runs = [r for r in recs if r.curve.get("tokens")]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    cmap = plt.get_cmap("viridis")
    sizes = sorted({r.size for r in runs}, key=lambda s: next(x.params for x in runs if x.size == s))
    for r in runs:
        shade = cmap(0.15 + 0.7 * sizes.index(r.size) / max(1, len(sizes) - 1))
        ls = "-" if r.family == "floatlm" else "--"
        t, loss = np.array(r.curve["tokens"]), np.array(r.curve["loss"])
        keep = t > 0
        axes[0].plot(t[keep], loss[keep], ls, color=shade, lw=1, label=f"{FAMILY_LABEL.get(r.family, r.family)} {r.size}")
        if r.val_curve.get("tokens"):
            vt, vl = np.array(r.val_curve["tokens"]), np.array(r.val_curve["val_loss"])
            keep = vt > 0
            axes[1].plot(vt[keep], vl[keep], ls, marker=".", color=shade, lw=1,
                         label=f"{FAMILY_LABEL.get(r.family, r.family)} {r.size}")
    for ax, title in zip(axes, ["training loss", "validation loss"]):
        ax.set_xscale("log")
        ax.set_xlabel("tokens")
        ax.set_title(title + " (solid: FloatLM, dashed: TriLM)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats/token)")
    axes[1].legend(fontsize=7, ncol=2)
    return _save(fig, path)


def scaling(recs: list[ModelRecord], fits: dict, path: Path, x: str = "params", paper: bool = False) -> Path | None:
    """Validation loss vs parameters (x='params') or vs size in bits (x='size_bits'), with fitted laws."""
    pts = [r for r in recs if r.val_loss is not None and getattr(r, x)]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for fam in FAMILY_ORDER:
        fr = sorted((r for r in pts if r.family == fam), key=lambda r: getattr(r, x))
        if not fr:
            continue
        xs = np.array([getattr(r, x) for r in fr], dtype=float)
        ax.plot(xs, [r.val_loss for r in fr], MARKERS[fam], color=COLORS[fam], label=FAMILY_LABEL[fam])
        fit = fits.get(fam)
        if fit is not None and x == "params":
            grid = np.geomspace(xs.min() * 0.8, xs.max() * 1.25, 100)
            ax.plot(grid, fit.predict(grid), "-", color=COLORS[fam], alpha=0.6,
                    label=f"fit: {fit.A:.3g}/N^{fit.alpha:.3f}+{fit.eps:.3f}")
        elif fit is not None and x == "size_bits":
            # same law, drawn through the family's (params -> bits) map
            params = np.array([r.params for r in fr], dtype=float)
            ax.plot(xs, fit.predict(params), "-", color=COLORS[fam], alpha=0.6)
    if paper:
        from spectra.report.paper import PAPER_PARAMS, SCALING

        grid = np.geomspace(min(PAPER_PARAMS.values()), max(PAPER_PARAMS.values()), 100)
        for fam, law in SCALING.items():
            if x == "params":
                ax.plot(grid, law["A"] / grid ** law["alpha"] + law["eps"], ":", color=COLORS[fam],
                        label=f"paper {FAMILY_LABEL[fam]} law (300B tokens, NeoX tokenizer)")
    ax.set_xscale("log")
    ax.set_xlabel("parameters" if x == "params" else "size in bits")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"validation loss vs {'parameters' if x == 'params' else 'size in bits'}")
    return _save(fig, path)


def score_vs_bits(recs: list[ModelRecord], path: Path, metric: str = "six_task_avg", paper: bool = False) -> Path | None:
    """Benchmark score (or validation perplexity) vs size in bits per family (the paper's Table 7 view)."""
    def value(r):
        return r.val_ppl if metric == "val_ppl" else getattr(r, metric)

    pts = [r for r in recs if value(r) is not None and r.size_bits]
    if not pts and not paper:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for fam in FAMILY_ORDER:
        fr = sorted((r for r in pts if r.family == fam), key=lambda r: r.size_bits)
        if fr:
            ax.plot([r.size_bits for r in fr], [value(r) for r in fr], "-" + MARKERS[fam], color=COLORS[fam],
                    label=FAMILY_LABEL[fam])
    if paper and metric == "six_task_avg":
        from spectra.report.paper import SIX_TASK_AVG, size_bits

        for fam in ["floatlm", "q8", "q6", "q4", "q3", "trilm"]:
            sizes = list(SIX_TASK_AVG)
            ax.plot([size_bits(fam, s) for s in sizes], [SIX_TASK_AVG[s][fam] for s in sizes], ":" + MARKERS[fam],
                    color=COLORS[fam], alpha=0.5, mfc="none", label=f"paper {FAMILY_LABEL[fam]}")
    ax.set_xscale("log")
    ax.set_xlabel("size in bits")
    ax.set_ylabel("6-task average (%)" if metric == "six_task_avg" else "validation perplexity")
    if metric == "val_ppl":
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(("6-task average" if metric == "six_task_avg" else "validation perplexity") + " vs size in bits")
    return _save(fig, path)


def checkpoint_curves(recs: list[ModelRecord], path: Path, metric: str = "val_loss", paper: bool = False) -> Path | None:
    """Metric vs tokens over intermediate checkpoints (Pythia-style)."""
    runs = [r for r in recs if any(c.get(metric) is not None for c in r.checkpoints)]
    if not runs and not paper:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in runs:
        cs = sorted((c for c in r.checkpoints if c.get(metric) is not None and c.get("tokens")), key=lambda c: c["tokens"])
        ax.plot([c["tokens"] for c in cs], [c[metric] for c in cs], ("-" if r.family == "floatlm" else "--") + ".",
                color=COLORS.get(r.family, "k"), alpha=0.4 + 0.6 * (r.params / max(x.params for x in runs)),
                label=f"{FAMILY_LABEL.get(r.family, r.family)} {r.size}")
    if paper and metric == "val_ppl":
        from spectra.report.paper import TRILM_PPL

        for size, pts in TRILM_PPL.items():
            ax.plot(list(pts), list(pts.values()), ":*", color=COLORS["trilm"], mfc="none", label=f"paper TriLM {size}")
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{metric} across intermediate checkpoints")
    return _save(fig, path)
