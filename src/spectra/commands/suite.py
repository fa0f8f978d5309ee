"""spectra suite: a whole Spectra family — train, quantize, pack, evaluate, report."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("suite", help="train FloatLM+TriLM per size, quantize, pack, evaluate and report")
    p.add_argument("--preset", default="tiny", help="tiny (this CPU, ~15 min) | small (CPU, ~hours) | spectra (the "
                   "real nine sizes / 300B tokens, for GPU clusters)")
    p.add_argument("--out", help="suite directory (default: runs/suite-<preset>)")
    p.add_argument("--data", help="corpus source (path, hf:NAME, default) or an existing `spectra data` directory")
    p.add_argument("--sizes", help="comma-separated subset of the preset's sizes")
    p.add_argument("--tokens", type=int, help="training tokens per model (overrides the preset)")
    p.add_argument("--task-data", help="local lm-eval task data (default: $SPECTRA_TASK_DATA, then the "
                   "`spectra tasks fetch` cache, then lm-eval's Hub datasets)")
    p.add_argument("--no-tasks", action="store_true", help="skip lm-eval tasks (validation loss only)")
    p.add_argument("--eval-limit", type=int, help="examples per lm-eval task")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from spectra.suite import Suite, describe_plan, make_plan, measured_cpu_flops

    sizes = [s.strip() for s in args.sizes.split(",")] if args.sizes else None
    over = {"data": args.data, "tokens": args.tokens, "task_data": args.task_data, "threads": args.threads,
            "eval_limit": args.eval_limit}
    if args.no_tasks:
        over["eval_tasks"] = ""
    plan = make_plan(args.preset, sizes, **over)
    if args.dry_run:
        print(describe_plan(plan, measured_cpu_flops(args.threads)))
        if args.preset == "spectra":
            print("\nThe 'spectra' preset is meant for GPU clusters: run the printed stages with "
                  "`torchrun --nproc-per-node N -m spectra train ...` per size (see docs/suite.md).")
        return 0
    from spectra.fsutil import claim_output

    out = Path(args.out or f"runs/suite-{args.preset}")
    # --out policy + lock (docs/security.md); Suite itself refuses a directory holding another suite
    # and never replaces --out (its data may be an earlier suite's, inside it)
    with claim_output(out, "suite", mark=False,
                      owned=lambda p: (p / "suite.json").is_file()):
        Suite(plan, out, progress=not args.quiet).run()
    return 0
