"""spectra import / export / verify-ternary: Hugging Face and GGUF interoperability."""

from __future__ import annotations


_FORCE_HELP = ("replace an existing --out that this command did not write (never one holding the input); "
               "see docs/security.md")


def _is_gguf(p) -> bool:
    """An existing .gguf file (which export may replace without --force)."""
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def register(sub) -> None:
    from spectra.store.dtypes import DTYPE_NAMES

    p = sub.add_parser("import", help="Hugging Face Llama directory (e.g. a SpectraSuite release) -> spectra checkpoint",
                       description="Import any Llama-architecture HF directory (safetensors, sharded or not, or .bin "
                                   "loaded with weights_only=True). A TriLM's ternary states and per-shard gammas are "
                                   "recovered from the unpacked weights and verified.")
    p.add_argument("src", metavar="HF_DIR", help="a local directory or a Hub id OWNER/NAME (huggingface_hub cache; "
                                                "HF_HUB_OFFLINE=1: cache only)")
    p.add_argument("--revision", default=None, help="Hub id only: branch, tag or commit (default: main)")
    p.add_argument("--out", required=True, metavar="CKPT", help="output model directory (written atomically)")
    p.add_argument("--family", default="auto", choices=["auto", "trilm", "floatlm", "quantlm"],
                   help="auto: from config (pretraining_model_parallel / spectra.family) or by counting magnitudes")
    p.add_argument("--mp", type=int, default=None,
                   help="assert the TriLM model-parallel degree (default: config's pretraining_model_parallel, else inferred)")
    p.add_argument("--dtype", default="keep", choices=["keep", *DTYPE_NAMES],
                   help="dtype of the written weights (default: keep the source's)")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(func=run_import)

    p = sub.add_parser("export", help="spectra checkpoint -> Hugging Face directory or GGUF file (llama.cpp)",
                       description="--to hf: a LlamaForCausalLM directory transformers loads with no custom code. "
                                   "--to gguf: a llama.cpp GGUF file (llama architecture, tokenizer embedded); "
                                   "tq2_0/tq1_0 store TriLM matrices losslessly with block scales = per-shard gamma (fp16).")
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("--to", required=True, choices=["hf", "gguf"])
    p.add_argument("--out", required=True, help="output directory (hf) or .gguf file (gguf)")
    p.add_argument("--dtype", default="float16", choices=DTYPE_NAMES,
                   help="hf: weight dtype (default float16, as the SpectraSuite release)")
    p.add_argument("--type", default=None, choices=["tq2_0", "tq1_0", "q8_0", "f16", "f32"],
                   help="gguf: type of the block matrices (default: tq2_0 for a TriLM, f16 otherwise)")
    p.add_argument("--head-type", default="auto", choices=["auto", "f32", "f16", "q8_0"],
                   help="gguf: output head type (auto: q8_0 with --type q8_0, f32 with f32, else f16)")
    p.add_argument("--embed-type", default="auto", choices=["auto", "f32", "f16", "q8_0"],
                   help="gguf: token embedding type (auto: like --head-type)")
    p.add_argument("--tokenizer", default=None,
                   help="gguf: tokenizer.json to embed (default: the checkpoint's own tokenizer.json)")
    p.add_argument("--name", default=None, help="gguf: general.name (default: the checkpoint directory name)")
    p.add_argument("--eval-results", default=None, metavar="JSON",
                   help="hf: a `spectra eval --out` results JSON for the model card's evaluation table")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="hf: upload the exported directory (with its model card) to the Hub repository OWNER/NAME")
    p.add_argument("--private", action="store_true", help="--push-to-hub: create the repository private")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(func=run_export)

    p = sub.add_parser("verify-ternary", help="check that every block matrix is ternary per shard (<= 1 + MP distinct |w|)",
                       description="Per matrix: distinct |w| values, the shard layout and gammas, and pass/fail against "
                                   "'<= 1 + MP distinct magnitudes' (the SpectraSuite README check) plus the per-shard "
                                   "structure. Exit code 1 when any matrix fails.")
    p.add_argument("path", metavar="DIR")
    p.add_argument("--mp", type=int, default=None, help="model-parallel degree to check against (default: from config, else inferred)")
    p.add_argument("--failed-only", action="store_true", help="list only failing matrices")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_verify)


def run_import(args) -> int:
    from spectra.fsutil import claim_output
    from spectra.interop.hf import import_hf
    from spectra.store import resolve

    src = resolve(args.src, args.revision)
    with claim_output(args.out, "import", inputs=[src], force=args.force):
        conv = import_hf(src, args.out, family=args.family, mp=args.mp, dtype=args.dtype)
    c = conv.cfg
    print(f"imported {args.src} -> {args.out}: {conv.family}, dim={c.dim} layers={c.n_layers} heads={c.n_heads} "
          f"ffn={c.ffn_dim} vocab={c.vocab_size}")
    if conv.family == "trilm":
        print(f"ternary: {len(conv.layouts)} matrices verified exact at mp={c.mp} ({conv.mp_source}); "
              f"per-shard gammas in {args.out}/ternary_layout.json")
    return 0


def run_export(args) -> int:
    from spectra.fsutil import claim_output

    inputs = [args.ckpt, args.tokenizer, args.eval_results]
    if args.to == "hf":
        from pathlib import Path

        from spectra.interop.hf import export_hf
        from spectra.interop.modelcard import load_eval_results, push_to_hub, write_model_card

        results = load_eval_results(args.eval_results) if args.eval_results else None  # bad input: before any work
        card = Path(args.out) / "README.md"
        with claim_output(args.out, "export", inputs=inputs, force=args.force):
            # the card goes into the new tree before the swap (docs/security.md)
            conv = export_hf(args.ckpt, args.out, dtype=args.dtype, before_swap=lambda tmp: write_model_card(
                args.ckpt, tmp, results, name=args.name or Path(args.out).name))
        extra = f", pretraining_model_parallel={conv.cfg.mp}" if conv.family == "trilm" else ""
        print(f"exported {args.ckpt} -> {args.out} (Hugging Face LlamaForCausalLM, {args.dtype}{extra}; card {card.name})")
        if args.push_to_hub:
            print(f"pushed to {args.push_to_hub}: {push_to_hub(args.out, args.push_to_hub, private=args.private)}")
        return 0
    if args.push_to_hub or args.eval_results:
        from spectra.errors import SpectraError

        raise SpectraError("--push-to-hub and --eval-results apply to --to hf")
    from spectra.interop.gguf_export import export_gguf

    with claim_output(args.out, "export", inputs=inputs, force=args.force, file=True, owned=_is_gguf):
        res = export_gguf(args.ckpt, args.out, qtype=args.type, head_type=args.head_type,
                          embed_type=args.embed_type, tokenizer=args.tokenizer, name=args.name)
    print(res.summary())
    return 0


def run_verify(args) -> int:
    import json

    from spectra.interop.verify import format_table, verify_dir

    rep = verify_dir(args.path, mp=args.mp)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(format_table(rep, only_failed=args.failed_only))
    return 0 if rep.ok else 1
