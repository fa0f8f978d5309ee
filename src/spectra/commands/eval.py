"""spectra eval: lm-eval tasks, perplexity and validation loss for checkpoints."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="zero-shot lm-eval tasks (spectra6/spectra13), perplexity, validation loss",
        description="Evaluate checkpoints with lm-evaluation-harness's own task definitions (the 'spectra' lm-eval "
                    "model), sliding-window perplexity on raw text, and validation loss on token shards. Prints a "
                    "markdown table with the 6-task average and writes results JSON (+ .md next to it).")
    p.add_argument("ckpt", nargs="+", help="model directory (spectra FloatLM/TriLM/QuantLM or any HF Llama dir); "
                                           "several: one results file each (--out is then a directory)")
    p.add_argument("--tasks", default=None,
                   help="spectra6 | spectra13 | comma-separated lm-eval task names (default: spectra6, or none "
                        "when only --ppl/--val-data is given)")
    p.add_argument("--task-data", default=None, metavar="DIR",
                   help="local JSON Lines in the HF schema, the layout `spectra tasks fetch` writes (docs/evaluation.md); "
                        "without it: $SPECTRA_TASK_DATA, the user cache, then the hub datasets")
    p.add_argument("--limit", type=float, default=None, help="documents per task (int) or fraction (<1)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="cap on rows x length per forward (default 8192)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or tokenizer.json (default: the model dir's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ppl", nargs="+", default=None, metavar="FILE", help="raw UTF-8 text files: perplexity and bits/byte")
    p.add_argument("--ppl-seq-len", type=int, default=None, help="window length in tokens (default: model context)")
    p.add_argument("--ppl-stride", type=int, default=None,
                   help="tokens the window advances (default = seq len: disjoint windows, lm-eval's rolling "
                        "perplexity; smaller = more context per token, more compute)")
    p.add_argument("--ppl-max-tokens", type=int, default=None, help="score only the first N tokens of each file")
    p.add_argument("--val-data", default=None, metavar="DIR", help="token shard directory: validation loss")
    p.add_argument("--val-seq-len", type=int, default=512)
    p.add_argument("--val-windows", type=int, default=64, help="windows of val-seq-len tokens to score (0 = all)")
    p.add_argument("--bootstrap-iters", type=int, default=100, help="lm-eval bootstrap iterations for stderr (0 = none)")
    p.add_argument("--log-samples", action="store_true", help="keep per-document samples in the results JSON")
    p.add_argument("--out", default=None, help="results JSON path (several checkpoints: a directory)")
    p.set_defaults(func=run)


def _limit(v):
    if v is None:
        return None
    return int(v) if v >= 1 and float(v).is_integer() else v


def _check_numbers(args) -> None:
    """Zero or negative sizes are refused (0 never silently means 'default')."""
    import math

    from spectra.errors import SpectraError
    from spectra.validate import check_positive, check_threads

    if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
        raise SpectraError(f"--limit must be a positive number (documents, or a fraction < 1), got {args.limit}")
    for flag in ("batch_size", "max_batch_tokens", "ppl_seq_len", "ppl_stride", "ppl_max_tokens", "val_seq_len"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    check_positive(args.val_windows, "--val-windows", zero_ok=True)
    check_positive(args.bootstrap_iters, "--bootstrap-iters", zero_ok=True)
    check_threads(args.threads)
    if args.ppl_stride and args.ppl_seq_len and args.ppl_stride > args.ppl_seq_len:
        raise SpectraError(f"--ppl-stride {args.ppl_stride} exceeds --ppl-seq-len {args.ppl_seq_len}")


def _is_results(p) -> bool:
    """A results JSON an earlier `spectra eval` wrote (replaced without --force)."""
    import json

    try:
        d = json.loads(Path(p).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "tasks" in d and "settings" in d


def _check_out_policy(args, many: bool) -> None:
    """The --out policy (docs/security.md): never an input, never a file eval did not write."""
    from spectra.fsutil import check_output

    if many:  # a directory of results files; each file is checked as it is written below
        check_output(args.out, "eval", inputs=args.ckpt, owned=lambda d: all(
            _is_results(f) if f.suffix == ".json" else f.suffix == ".md" and f.with_suffix(".json").is_file()
            for f in Path(d).iterdir()))
    else:
        check_output(args.out, "eval", inputs=args.ckpt, file=True, owned=_is_results)


def run(args) -> int:
    from spectra.errors import SpectraError
    from spectra.eval import evaluate, markdown, write_results

    tasks = args.tasks
    if tasks is not None and not [t for t in tasks.split(",") if t.strip()]:
        raise SpectraError(f"--tasks {tasks!r} names no task; give spectra6, spectra13 or lm-eval task names "
                           "(or leave --tasks out and give --ppl / --val-data)")
    if tasks is None and not (args.ppl or args.val_data):
        tasks = "spectra6"
    _check_numbers(args)
    many = len(args.ckpt) > 1
    if many and args.out and Path(args.out).suffix == ".json":
        raise SpectraError("--out must be a directory when several checkpoints are given")
    if args.out:  # before any work: a results path that cannot be written fails now, not after the run
        from spectra.validate import check_out_writable

        check_out_writable(args.out, "--out", "dir" if many else "file")
        _check_out_policy(args, many)
    model_args = {"dtype": args.dtype}
    if args.threads:
        model_args["threads"] = args.threads
    for ckpt in args.ckpt:
        out = args.out
        if many and out:
            out = Path(out) / f"{Path(ckpt).resolve().name}.json"
        res = evaluate(ckpt, tasks=tasks, task_data=args.task_data, limit=_limit(args.limit),
                       batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, tokenizer=args.tokenizer,
                       ppl_files=args.ppl, ppl_seq_len=args.ppl_seq_len, ppl_stride=args.ppl_stride,
                       ppl_max_tokens=args.ppl_max_tokens, val_data=args.val_data, val_seq_len=args.val_seq_len,
                       val_windows=args.val_windows or None, bootstrap_iters=args.bootstrap_iters,
                       log_samples=args.log_samples, model_args=model_args)
        print(markdown(res))
        if out:
            j, md = write_results(res, out)
            print(f"wrote {j} and {md}")
    return 0
