"""spectra tasks: fetch / list evaluation data for offline use."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("tasks", help="fetch / list lm-eval evaluation data for offline use",
                       description="Download the evaluation sets lm-eval's tasks use (the same Hugging Face "
                                   "datasets) into the local layout `spectra eval` and `spectra suite` read without "
                                   "a network. Default directory: the user cache $SPECTRA_HOME/tasks "
                                   "(~/.cache/spectra/tasks), which eval and suite look in after --task-data and "
                                   "$SPECTRA_TASK_DATA.")
    tsub = p.add_subparsers(dest="tasks_command", metavar="ACTION")
    f = tsub.add_parser("fetch", help="download tasks (through `datasets`) and write JSON Lines + manifest.json")
    f.add_argument("--tasks", default="spectra13", help="spectra6 | spectra13 | comma-separated task names "
                                                       "(default spectra13)")
    f.add_argument("--dir", default=None, help="target directory (default: the user cache)")
    f.set_defaults(func=run_fetch)
    ls = tsub.add_parser("list", help="show which tasks are cached (sha256 checked against the manifest)")
    ls.add_argument("--dir", default=None, help="directory to list (default: where eval would look)")
    ls.set_defaults(func=run_list)
    p.set_defaults(func=lambda args: p.print_help() or 0)


def run_fetch(args) -> int:
    from spectra.eval.fetch import fetch
    from spectra.eval.tasks import task_cache_dir

    out = args.dir or task_cache_dir()
    fetch(args.tasks, out)
    print(f"task data in {out} (manifest.json); `spectra eval` finds it "
          + ("there automatically" if not args.dir else f"with --task-data {out} or SPECTRA_TASK_DATA={out}"))
    return 0


def run_list(args) -> int:
    from spectra.eval.fetch import status
    from spectra.eval.tasks import resolve_task_data, task_cache_dir

    if args.dir:
        d, src = args.dir, "--dir"
    else:
        td = resolve_task_data()
        d, src = (td.path, td.source) if td.path else (task_cache_dir(), "user cache (empty)")
    print(f"task data: {d} ({src})")
    rows = status(d)
    for r in rows:
        print(f"  {r['task']:20s} {'' if r['rows'] is None else r['rows']:>7} {r['file'] or '-':34s} {r['state']}")
    n = sum(r["state"] == "ok" or r["state"].startswith("present") for r in rows)
    print(f"{n} of {len(rows)} tasks available locally" + ("" if n else "; run `spectra tasks fetch`"))
    return 1 if any(r["state"].startswith("CHANGED") for r in rows) else 0
