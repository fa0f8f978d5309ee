"""spectra info: parameters and size in bits of the presets (config arithmetic only: no torch)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="parameters and size in bits per family for the presets")
    p.add_argument("--preset", action="append", help="preset name (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def preset_rows(names=None) -> list[dict]:
    from spectra.config import PRESETS, get_preset
    from spectra.sizes import FAMILIES, count_params, size_bits

    presets = [get_preset(n) for n in names] if names else list(PRESETS.values())
    rows = []
    for p in presets:
        c = count_params(p.model)  # from shapes; equals a meta-device count (tested)
        row = {"preset": p.name, "dim": p.model.dim, "ffn": p.model.ffn_dim, "heads": p.model.n_heads,
               "layers": p.model.n_layers, "mp": p.model.mp, "vocab": p.model.vocab_size,
               "params": c["total"], "paper_count": c["paper"], "non_embedding": c["non_embedding"],
               "ternary_eligible": c["linear"]}
        for fam in FAMILIES:
            row[f"bits_{fam}"] = size_bits(c, fam, p.model)
        rows.append(row)
    return rows


def run(args) -> int:
    import json

    rows = preset_rows(args.preset)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ["preset", "dim", "ffn", "heads", "layers", "mp", "vocab", "params", "non-emb", "ternary",
            "Float Gb", "Q8 Gb", "Q6 Gb", "Q4 Gb", "Q3 Gb", "TriLM Gb"]
    fmt_p = lambda n: f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"  # noqa: E731
    table = [head]
    for r in rows:
        table.append([r["preset"], str(r["dim"]), str(r["ffn"]), str(r["heads"]), str(r["layers"]), str(r["mp"]),
                      str(r["vocab"]), fmt_p(r["params"]), fmt_p(r["non_embedding"]), fmt_p(r["ternary_eligible"])]
                     + [f"{r[f'bits_{f}'] / 1e9:.3f}" for f in ("floatlm", "q8", "q6", "q4", "q3", "trilm")])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nparams = all weights incl. norms; Gb = size in 1e9 bits (embedding, head, norms at 16 bits; "
          "Q4/Q3 at 4.25/3.25 bits, TriLM at log2(3) bits per linear weight + per-shard scales)")
    return 0
