"""spectra quantize: GPTQ / RTN a FloatLM into QuantLMs (one per bit width and calibration seed)."""

from __future__ import annotations


def register(sub) -> None:
    from spectra.store.dtypes import DTYPE_NAMES

    p = sub.add_parser(
        "quantize", help="GPTQ/RTN post-training quantization of a FloatLM into QuantLMs",
        description="Quantize every linear layer inside the blocks of a FloatLM (embedding and head stay 16-bit). "
                    "Writes, per (bits, seed): OUT/q{bits}-g{group}-s{seed}/ (unpacked fp16 model dir), "
                    "OUT/q{bits}-g{group}-s{seed}-packed/ (AutoGPTQ/GPTQModel layout) and a per-layer "
                    "quant_report.json. See docs/quantization.md.")
    p.add_argument("checkpoint", metavar="CKPT", help="FloatLM model directory (spectra or HF Llama)")
    p.add_argument("--bits", default="3,4,6,8", help="comma-separated bit widths from 2,3,4,6,8 (default 3,4,6,8)")
    p.add_argument("--group-size", type=int, default=128, help="columns per scale; -1 = one scale per row (default 128)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="gptq (default) or round-to-nearest")
    p.add_argument("--calib", metavar="DATA", help="token data directory built by `spectra data` (needed for gptq)")
    p.add_argument("--calib-split", default="train", help="split of DATA to draw calibration windows from (default train)")
    p.add_argument("--nsamples", type=int, default=512, help="calibration windows (default 512, as the paper)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds, one QuantLM each (default 0,1,2)")
    p.add_argument("--damp", type=float, default=0.01, help="damping, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--blocksize", type=int, default=128, help="GPTQ lazy-batch block (default 128)")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing H_jj (desc_act)")
    p.add_argument("--static-groups", action="store_true", help="group scales from the original weights")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="take all Hessians of a block from its float inputs (default: q/k/v, o, gate/up, down in turn)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float16",
                   help="dtype of the unpacked weights and unquantized tensors (default float16, as the release)")
    p.add_argument("--no-packed", dest="packed", action="store_false", help="write only the unpacked checkpoints")
    p.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq",
                   help="packed zero-point convention: gptq (v1, stores zero-1; default) or gptq_v2")
    p.add_argument("--chunk-tokens", type=int, default=16384, help="tokens per forward chunk (memory knob)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty --out that `spectra quantize` "
                                                        "did not write (never one holding the input); docs/security.md")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def _int_list(s: str, flag: str) -> list[int]:
    from spectra.errors import SpectraError

    try:
        vals = [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise SpectraError(f"{flag} must be comma-separated integers, got {s!r}") from None
    if not vals:
        raise SpectraError(f"{flag} is empty")
    return list(dict.fromkeys(vals))


def run(args) -> int:
    from spectra.fsutil import claim_output
    from spectra.store import resolve

    args.checkpoint = str(resolve(args.checkpoint))  # a Hub id OWNER/NAME: its local snapshot

    # --out policy + lock for the whole run (docs/security.md); results are added in place
    with claim_output(args.out, "quantize", inputs=[args.checkpoint, args.calib], force=args.force, mark=False,
                      owned=lambda p: (p / "quantize_summary.json").is_file() or (p / "quantize_log.jsonl").is_file()):
        return _run(args)


def _run(args) -> int:
    import json
    import time
    from pathlib import Path

    import torch

    from spectra.errors import SpectraError
    from spectra.fsutil import atomic_write_json, write_marker
    from spectra.quant import QuantSpec, calibration_tokens, quantize_model, refuse_non_float, save_quantized
    from spectra.store import find_tokenizer, load_model, quantlm_name, read_model_config, torch_dtype

    from spectra.validate import check_finite_weights, check_threads

    if check_threads(args.threads):
        torch.set_num_threads(args.threads)
    bits_list = _int_list(args.bits, "--bits")
    seeds = _int_list(args.seeds, "--seeds") if args.method == "gptq" else [None]
    src = Path(args.checkpoint)
    cfg, d = read_model_config(src)
    refuse_non_float(config=d, source=str(src))
    # Validate everything before the long work: bits, group size vs shapes, calibration.
    dims = {"q/k/v/o/gate/up (dim)": cfg.dim, "down_proj (ffn_dim)": cfg.ffn_dim}
    specs = [QuantSpec(b, args.group_size, args.method, args.act_order, args.static_groups, args.damp, args.blocksize,
                       args.true_sequential).validate(dims) for b in bits_list]
    if args.packed and (cfg.dim % 32 or cfg.ffn_dim % 32):
        raise SpectraError(f"the packed GPTQ layout needs dim ({cfg.dim}) and ffn_dim ({cfg.ffn_dim}) to be multiples "
                           "of 32; pass --no-packed for unpacked checkpoints only")
    if args.method == "gptq":
        if not args.calib:
            raise SpectraError("GPTQ needs calibration data: --calib DATA (a directory built by `spectra data`)")
        if args.seqlen > cfg.max_seq_len:
            raise SpectraError(f"--seqlen {args.seqlen} exceeds the model context {cfg.max_seq_len}; "
                               f"use --seqlen {cfg.max_seq_len} or less")
    calibs = {s: calibration_tokens(args.calib, args.nsamples, args.seqlen, s, args.calib_split) for s in seeds} \
        if args.method == "gptq" else {None: None}

    model, _ = load_model(src, dtype=torch.float32)
    refuse_non_float(model, source=str(src))
    check_finite_weights(model.state_dict(), str(src))  # NaN/Inf weights gave a NaN QuantLM with rc 0
    tokenizer = find_tokenizer(src)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "quantize")
    log_path = out / "quantize_log.jsonl"
    dtype = torch_dtype(args.dtype)
    results = []
    for spec in specs:
        for seed in seeds:
            name = quantlm_name(spec.bits, spec.group_size, spec.method, seed)
            print(f"[quantize] {name}: {spec.method} {spec.bits}-bit, group {spec.group_size}"
                  + (f", calibration {args.nsamples}x{args.seqlen} seed {seed}" if seed is not None else ""), flush=True)

            def log(rec, name=name):
                with open(log_path, "a") as f:
                    f.write(json.dumps({"output": name, **rec}) + "\n")

            t0 = time.perf_counter()
            mq, qstate, report = quantize_model(
                model, calibs[seed], spec.bits, spec.group_size, spec.method, spec.act_order, spec.static_groups,
                spec.damp, spec.true_sequential, blocksize=spec.blocksize, chunk_tokens=args.chunk_tokens,
                progress=args.progress, on_linear=log)
            report.update({"source": str(src.resolve()), "seed": seed, "calib": args.calib,
                           "calib_split": args.calib_split if seed is not None else None})
            meta = {"seed": seed, "source": str(src.resolve()), "calib": args.calib,
                    "nsamples": args.nsamples if seed is not None else None,
                    "seqlen": args.seqlen if seed is not None else None,
                    "act_order": spec.act_order, "static_groups": spec.static_groups, "damp": spec.damp,
                    "source_spectra": d.get("spectra", {})}
            paths = save_quantized(mq, qstate, out / name, spec, dtype=dtype, meta=meta, tokenizer=tokenizer,
                                   packed=args.packed, checkpoint_format=args.checkpoint_format, report=report)
            secs = time.perf_counter() - t0
            row = {"name": name, "bits": spec.bits, "group_size": spec.group_size, "method": spec.method, "seed": seed,
                   "seconds": round(secs, 2), "total_loss": report["total_loss"],
                   **{k: str(v) for k, v in paths.items()}}
            results.append(row)
            print(f"[quantize] {name}: done in {secs:.1f}s, GPTQ loss {report['total_loss']:.4g} -> "
                  + ", ".join(str(v) for v in paths.values()), flush=True)
            del mq, qstate
    atomic_write_json(out / "quantize_summary.json", {"source": str(src.resolve()), "outputs": results})
    return 0
