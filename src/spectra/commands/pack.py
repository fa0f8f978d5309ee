"""spectra pack: TriLM checkpoint -> packed ternary directory (t2 / t1, f16 or q8 head)."""

from __future__ import annotations


def register(sub) -> None:
    from spectra.infer.formats import FORMATS, HEAD_FORMATS  # the tables (no numpy at import)

    p = sub.add_parser("pack", help="pack a TriLM checkpoint into ternary weights (" + ", ".join(FORMATS) + ")",
                       description="Pack a TriLM checkpoint. The packed model dequantizes exactly to the "
                                   "checkpoint's gamma*W_hat (per-shard gamma kept in fp32); embeddings stay f16; "
                                   "the head is f16 or int8 with per-row scales. Layout: docs/packed-format.md.")
    p.add_argument("checkpoint", help="TriLM model directory (spectra or Hugging Face layout)")
    p.add_argument("--format", dest="fmt", default="t2", choices=list(FORMATS),
                   help="; ".join(f"{f.name}: {f.help}" for f in FORMATS.values()))
    p.add_argument("--head", default="f16", choices=list(HEAD_FORMATS),
                   help="output head precision (default f16): " + "; ".join(f"{h.name}: {h.help}" for h in HEAD_FORMATS.values()))
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the result to check exactness")
    p.add_argument("--force", action="store_true", help="replace an existing --out that `spectra pack` did not "
                                                        "write (never one holding the input); docs/security.md")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from spectra.store import resolve

    args.checkpoint = str(resolve(args.checkpoint))  # a Hub id OWNER/NAME: its local snapshot

    from spectra.store import from_hf_names, read_weights
    from spectra.infer.packed_model import PackedModel, write_packed

    from spectra.validate import check_out_writable

    check_out_writable(args.out, "--out", "dir")  # before the work, not after it
    from spectra.fsutil import claim_output

    # --out policy + lock (docs/security.md); a packed dir from before output markers has packed.json
    with claim_output(args.out, "pack", inputs=[args.checkpoint], force=args.force,
                      owned=lambda p: (p / "packed.json").is_file()):
        meta = write_packed(args.checkpoint, args.out, fmt=args.fmt, head=args.head)
    pm = PackedModel.load(args.out, verify=True)
    if not args.no_verify:  # reload and compare every matrix with the checkpoint, bit for bit
        sd = from_hf_names(read_weights(args.checkpoint))
        for m in pm.matrices():
            if not torch.equal(m.dequantize(), sd[f"{m.name}.weight"].float()):
                from spectra.errors import SpectraError

                raise SpectraError(f"{args.out}: '{m.name}' does not dequantize to the checkpoint's weights")
    lin = sum(a.nbytes for n, a in pm.arrays.items() if n.endswith((".trits", ".gamma")))
    emb = pm.arrays["embed_tokens.weight"].nbytes
    head = sum(pm.arrays[n].nbytes for n in ("lm_head.weight", "lm_head.q8", "lm_head.scale") if n in pm.arrays)
    print(f"packed {args.checkpoint} -> {args.out}: format {args.fmt}, head {args.head}, "
          f"{pm.file_bytes / 1e6:.2f} MB ({'verified exact' if not args.no_verify else 'not verified'})")
    print(f"  ternary matrices {lin / 1e6:.2f} MB at {meta['linear_bits_per_weight']:.4f} bits/weight (incl. fp32 gammas)")
    print(f"  embedding {emb / 1e6:.2f} MB (f16), head {head / 1e6:.2f} MB ({args.head}), "
          f"norms {sum(a.nbytes for n, a in pm.arrays.items() if n.endswith('norm.weight')) / 1e6:.3f} MB")
    return 0
