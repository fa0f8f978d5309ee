"""spectra generate: text from a packed TriLM (native kernel) or any checkpoint (PyTorch)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text (packed TriLM: native engine; any checkpoint: PyTorch)")
    p.add_argument("checkpoint", help="packed directory (spectra pack) or model directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text (needs tokenizer.json in the directory)")
    g.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not included in the output")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    from spectra.infer.backends import BACKENDS, CHOICES  # the backend table (no numpy/torch at import)

    p.add_argument("--backend", default="auto", choices=CHOICES,
                   help="auto (default: the first that fits and runs here); " + "; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()))
    p.add_argument("--kernel", default=None, choices=["auto", "scalar", "avx2", "avxvnni", "avx512", "neon", "i8mm"],
                   help="native code path (default: $SPECTRA_KERNEL or the best the CPU supports)")
    p.add_argument("--act", default="int8x2", choices=["int8x2", "int8"],
                   help="native activation quantization: int8x2 (int8 + int8 residual, ~15 bits; default) or int8 (faster prefill)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all available cores)")
    p.add_argument("--max-len", type=int, default=None, help="context length to allocate (default: the model's)")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check of a packed file")
    p.add_argument("--json", action="store_true", help="print a JSON record (text, ids, speeds) instead of streaming")
    p.set_defaults(func=run)


def _check_limits(args, model_max: int) -> None:
    """Flags checked before anything is allocated (a 1e8 --max-len once built 45 GB of RoPE tables)."""
    from spectra.validate import check_max_len, check_positive, check_threads

    check_threads(args.threads)
    check_max_len(args.max_len, model_max)
    check_positive(args.max_new_tokens, "--max-new-tokens", zero_ok=True)


def run(args) -> int:
    import json
    import sys

    from spectra.errors import SpectraError
    from spectra.infer.backends import open_engine
    from spectra.infer.generate import generate
    from spectra.infer.sampling import SamplingConfig
    from spectra.store import load, resolve
    from spectra.validate import check_memory, check_token_ids, runtime_bytes

    path = resolve(args.checkpoint)
    cfg = load(path, "config")
    eos, model_max = load(path, "meta").get("eos_token_id"), cfg.max_seq_len
    _check_limits(args, model_max)
    tok = load(path, "tokenizer", required=False)
    if args.prompt is not None:
        if tok is None:
            raise SpectraError(f"{path} has no tokenizer.json; use --prompt-ids")
        ids = tok.encode(args.prompt).ids
    else:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise SpectraError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed).validate()
    check_token_ids(ids, cfg.vocab_size, "--prompt-ids token" if args.prompt is None else "prompt token")
    # KV cache sized for this request (not the model's full context) unless --max-len says otherwise
    max_len = args.max_len or min(model_max, len(ids) + args.max_new_tokens)
    check_memory(runtime_bytes(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size, max_len, rows=128),
                 f"a context of {max_len} tokens", "lower --max-len / --max-new-tokens")
    engine = open_engine(path, args.backend, max_len=max_len, n_threads=args.threads, kernel=args.kernel,
                         verify=not args.no_verify, act=args.act)
    try:
        out = (lambda s: None) if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        res = generate(engine, ids, args.max_new_tokens, sampling, tok, args.stop,
                       None if args.ignore_eos else eos, on_text=out)
        if tok is None and not args.json:
            print(",".join(map(str, res.tokens)), end="")
    finally:
        engine.close()
    if args.json:
        print(json.dumps({"text": res.text, "tokens": res.tokens, "prompt_tokens": res.prompt_tokens,
                          "stop_reason": res.stop_reason, "prefill_tok_s": res.prefill_tps,
                          "decode_tok_s": res.decode_tps, "engine": engine.describe()}))
    else:
        print()
        print(f"[{engine.describe()}] {res.summary()}", file=sys.stderr)
    return 0
