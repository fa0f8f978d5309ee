"""spectra report: tables, scaling-law fits and plots from finished runs."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="report.md + PNG plots + CSV/JSON from suite dirs, training runs or eval results")
    p.add_argument("paths", nargs="+", help="suite directories, training run directories or `spectra eval` result JSONs")
    p.add_argument("--out", help="output directory (default: <first path>/report)")
    p.add_argument("--paper", action="store_true", help="draw the published Spectra numbers on the same axes")
    p.add_argument("--title", default="Spectra suite report")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty --out that `spectra report` "
                                                        "did not write (never one holding an input); docs/security.md")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from spectra.report import write_report

    out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
    if not args.out and Path(args.paths[0]).is_file():
        out = Path(args.paths[0]).parent / "report"
    from spectra.fsutil import claim_output, write_marker

    # --out policy + lock (docs/security.md); the default <run>/report lies inside an input, by design
    with claim_output(out, "report", inputs=args.paths, force=args.force, inside_input_ok=True, mark=False,
                      owned=lambda p: (p / "report.md").is_file()):
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "report")
        path = write_report(args.paths, out, paper=args.paper, title=args.title)
    print(f"wrote {path} (+ PNG plots, results.csv, results.json in {path.parent})")
    return 0
