"""spectra report: tables, scaling-law fits and plots from finished runs."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="report.md + PNG plots + CSV/JSON from suite dirs, training runs or eval results")
    p.add_argument("paths", nargs="+", help="suite directories, training run directories or `spectra eval` result JSONs")
    p.add_argument("--out", help="output directory (default: <first path>/report)")
    p.add_argument("--paper", action="store_true", help="draw the published Spectra numbers on the same axes")
    p.add_argument("--title", default="Spectra suite report")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from spectra.report import write_report

    out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
    if not args.out and Path(args.paths[0]).is_file():
        out = Path(args.paths[0]).parent / "report"
    path = write_report(args.paths, out, paper=args.paper, title=args.title)
    print(f"wrote {path} (+ PNG plots, results.csv, results.json in {path.parent})")
    return 0
