"""``spectra verify-ternary``: is every block matrix of a checkpoint gamma*W_hat per shard?

The SpectraSuite README's check is "at most 1 + MP distinct absolute values per
weight matrix" (zero plus one gamma per model-parallel shard). We report that
count and also the stronger structural check: the magnitudes sit where the
shard layout says (one gamma per column-/row-parallel block), with the gammas.
A matrix passes when both hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spectra.errors import SpectraError
from spectra.interop.layout import MAX_MP, MatrixLayout, analyse, is_block_linear, model_mp


@dataclass
class Row:
    layout: MatrixLayout
    allowed: int  # 1 + MP

    @property
    def count_ok(self) -> bool:
        return self.layout.distinct <= self.allowed

    @property
    def passed(self) -> bool:
        return self.count_ok and self.layout.ternary


@dataclass
class Report:
    path: str
    mp: int
    mp_source: str  # "config", "asserted" or "inferred"
    rows: list[Row]

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    @property
    def ok(self) -> bool:
        return bool(self.rows) and not self.failed

    def to_dict(self) -> dict:
        return {"path": self.path, "mp": self.mp, "mp_source": self.mp_source, "ok": self.ok,
                "matrices": [{"name": r.layout.name, "split": r.layout.split, "shape": list(r.layout.shape),
                              "distinct_abs": r.layout.distinct, "allowed": r.allowed,
                              "layout_mp": r.layout.mp, "gammas": r.layout.gammas,
                              "count_ok": r.count_ok, "layout_ok": r.layout.ternary,
                              "error": r.layout.error, "pass": r.passed} for r in self.rows]}


def verify_dir(path: str | Path, mp: int | None = None, max_mp: int = MAX_MP) -> Report:
    """Check every q/k/v/o/gate/up/down matrix of a model directory (ours or HF)."""
    from spectra.store import from_hf_names, read_config, read_weights

    path = Path(path)
    d = read_config(path)
    sd = from_hf_names(read_weights(path))
    names = [k for k in sd if is_block_linear(k)]
    if not names:
        raise SpectraError(f"{path}: no transformer-block linear weights (q/k/v/o/gate/up/down_proj) found")
    if mp is not None:
        source = "asserted"
    elif "pretraining_model_parallel" in d:
        mp, source = int(d["pretraining_model_parallel"]), "config"
    elif (d.get("spectra") or {}).get("family") == "trilm":
        mp, source = int(d["spectra"].get("mp", 1)), "config"
    else:
        source = "inferred"
    if mp is not None and mp < 1:
        raise SpectraError(f"model-parallel degree must be >= 1, got {mp}")
    if mp is None:  # infer one model-level layout from the matrices that are ternary
        first = [analyse(n, sd[n], None, max_mp)[0] for n in names]
        mp = model_mp(first)
    rows = [Row(analyse(n, sd[n], mp, max_mp)[0], 1 + mp) for n in names]
    return Report(str(path), mp, source, rows)


def _fmt_gammas(g: list[float], limit: int = 6) -> str:
    if not g:
        return "-"
    s = ", ".join(f"{x:.6g}" for x in g[:limit])
    return s + (f", ... ({len(g)})" if len(g) > limit else "")


def format_table(rep: Report, only_failed: bool = False) -> str:
    head = ["matrix", "split", "shape", "distinct |w|", "<= 1+MP", "layout", "gammas", "result"]
    lines = [head]
    for r in rep.rows:
        if only_failed and r.passed:
            continue
        lay = r.layout
        layout = f"mp={lay.mp}" if lay.ternary else "not ternary"
        lines.append([lay.name, lay.split, "x".join(map(str, lay.shape)), str(lay.distinct),
                      f"{'yes' if r.count_ok else 'NO'} ({r.allowed})", layout, _fmt_gammas(lay.gammas),
                      "PASS" if r.passed else "FAIL"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    n_fail = len(rep.failed)
    out.append("")
    out.append(f"{rep.path}: MP={rep.mp} ({rep.mp_source}); {len(rep.rows)} matrices, "
               f"{len(rep.rows) - n_fail} pass, {n_fail} fail -> {'PASS' if rep.ok else 'FAIL'}")
    for r in rep.failed[:10]:
        out.append(f"  FAIL {r.layout.name}: " + (r.layout.error or
                   f"{r.layout.distinct} distinct |w| > 1 + MP = {r.allowed}"))
    if n_fail > 10:
        out.append(f"  ... and {n_fail - 10} more")
    return "\n".join(out)
