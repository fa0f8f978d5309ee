"""spectra data build | info: tokenize a corpus into shards; describe a data directory."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("data", help="build token shards (+ tokenizer) from a corpus; show a data directory")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    b = dsub.add_parser("build", help="tokenize a corpus into flat token shards with a manifest")
    b.add_argument("--source", required=True,
                   help="a file or directory (.txt/.jsonl/.json/.ndjson[.gz|.zst], .parquet), "
                        "hf:NAME[:CONFIG] (Hugging Face datasets, streaming) or 'default' (embedded demo corpus)")
    b.add_argument("--out", required=True, help="output data directory")
    b.add_argument("--tokenizer", default="train-bpe",
                   help="tokenizer.json (or a directory holding one), or 'train-bpe' (default) to train a byte-level BPE")
    b.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary when training one (default 8192)")
    b.add_argument("--text-field", default="text", help="JSON key / parquet column / HF column with the text")
    b.add_argument("--txt-unit", default="paragraph", choices=("paragraph", "file", "line"),
                   help="what a document is in .txt files (default: blank-line separated paragraphs)")
    b.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of documents held out for validation (default 0.01; 0.05 for the demo corpus)")
    b.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    b.add_argument("--workers", type=int, default=2,
                   help="tokenizer worker processes (default 2; started once the corpus exceeds one batch)")
    b.add_argument("--num-partitions", type=int, default=1,
                   help="split a many-file source into K slices for K machines/jobs (needs --tokenizer FILE); "
                        "`spectra data merge` joins them (docs/data.md)")
    b.add_argument("--partition", type=int, default=0, help="which slice to build, 0..K-1 (e.g. $SLURM_ARRAY_TASK_ID)")
    b.add_argument("--shard-tokens", type=int, default=None, help="max tokens per shard file (default 2^27)")
    b.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"))
    b.add_argument("--mp", type=int, default=1, help="model-parallel degree for the padded vocabulary (128 x MP rule)")
    b.add_argument("--eos-token", default=None, help="end-of-document token (default: <|endoftext|>, </s>, ...)")
    b.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    b.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (at a document end)")
    b.add_argument("--hf-split", default="train", help="split of a hf: source (default train)")
    b.add_argument("--hf-data-files", action="append", default=None, help="data_files for a hf: source (repeatable)")
    b.add_argument("--hf-revision", default=None, help="revision of a hf: source")
    b.add_argument("--skip-bad-records", action="store_true",
                   help="skip (and count) jsonl lines that are not JSON or lack the text field instead of failing")
    b.add_argument("--force", action="store_true",
                   help="rebuild even if the inputs are unchanged, and replace an --out directory that "
                        "`spectra data build` did not write (never one holding the input; docs/security.md)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)

    g = dsub.add_parser("merge", help="join the slices of a partitioned build into one data directory",
                        description="Join `spectra data build --num-partitions K --partition I` outputs (all K, any "
                                    "order) into one dataset identical, shard for shard, to a single-machine build.")
    g.add_argument("parts", nargs="+", help="partition directories")
    g.add_argument("--out", required=True, help="output data directory (written atomically)")
    g.add_argument("--force", action="store_true", help="replace an --out directory `spectra data` did not write")
    g.set_defaults(func=run_merge)

    i = dsub.add_parser("info", help="print a data directory's manifest in human form")
    i.add_argument("dir", help="data directory")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.add_argument("--verify", action="store_true", help="also re-hash every shard")
    i.set_defaults(func=run_info)


def run_build(args) -> int:
    from spectra.data.build import DEFAULT_SHARD_TOKENS, build_dataset

    out = build_dataset(
        args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, text_field=args.text_field,
        val_fraction=args.val_fraction, seed=args.seed, num_workers=args.workers,
        shard_tokens=DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens, txt_unit=args.txt_unit,
        on_bad="skip" if args.skip_bad_records else "fail", max_docs=args.max_docs, max_tokens=args.max_tokens,
        hf_split=args.hf_split, hf_data_files=args.hf_data_files, hf_revision=args.hf_revision, dtype=args.dtype,
        mp=args.mp, eos_token=args.eos_token, force=args.force, progress=not args.no_progress,
        log=lambda m: print(m, flush=True), wait_lock=False, num_partitions=args.num_partitions,
        partition=args.partition,
    )
    print(out)
    return 0


def run_merge(args) -> int:
    from spectra.data.merge import merge_partitions

    print(merge_partitions(args.parts, args.out, force=args.force, log=lambda m: print(m, flush=True)))
    return 0


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def describe(data_dir, verify: bool = False) -> str:
    """The manifest of ``data_dir`` as readable text."""
    from pathlib import Path

    from spectra.data.manifest import SPLITS, read_manifest, verify_split

    m = read_manifest(data_dir)
    if verify:
        for s in SPLITS:
            verify_split(data_dir, m, s, "full")
    t, src, rd = m["tokenizer"], m["source"], m.get("read", {})
    lines = [f"data directory  {Path(data_dir).resolve()}",
             f"source          {src.get('description', src.get('kind'))}"]
    if src.get("text_field") and src.get("kind") != "default":
        lines.append(f"text field      {src['text_field']}" + (f" (txt unit: {src['txt_unit']})" if src.get("txt_unit") else ""))
    tok_origin = (f"trained {t.get('kind', 'BPE')} on the {t.get('trained_on', 'train split')}" if t.get("trained")
                  else f"from {t.get('path', '?')}")
    lines += [f"tokenizer       {t['file']} ({tok_origin}), sha256 {t['sha256'][:16]}...",
              f"vocabulary      {_fmt_int(t['vocab_size'])} ids, padded to {_fmt_int(t['padded_vocab'])} "
              f"(128 x mp={t['mp']}); eos {t['eos_token']!r} = {t['eos_id']}",
              f"token dtype     {m['dtype']}, EOS after every document, shards of <= {_fmt_int(m['shard_tokens'])} tokens",
              f"split           {m['split']['val_fraction']:.2%} of documents to validation by keyed hash "
              f"(seed {m['split']['seed']})"]
    for s in SPLITS:
        sp = m["splits"][s]
        lines.append(f"{s:<15} {_fmt_int(sp['documents'])} documents, {_fmt_int(sp['tokens'])} tokens, "
                     f"{sp['bytes'] / 1e6:.2f} MB of text, {len(sp['shards'])} shard(s)")
    total_tok = sum(m["splits"][s]["tokens"] for s in SPLITS)
    total_b = sum(m["splits"][s]["bytes"] for s in SPLITS)
    if total_tok:
        lines.append(f"bytes/token     {total_b / total_tok:.2f}")
    lim = m.get("limits", {})
    if lim.get("truncated") or lim.get("max_docs"):
        lines.append(f"limits          max_docs={lim.get('max_docs')} max_tokens={lim.get('max_tokens')} "
                     f"truncated={lim.get('truncated')}")
    probs = []
    if rd.get("bad_records"):
        probs.append(f"{rd['bad_records']} bad records skipped (first: {'; '.join(rd.get('offenders', [])[:3])})")
    if rd.get("replaced_chars"):
        probs.append(f"{rd['replaced_chars']} undecodable bytes replaced by U+FFFD")
    if rd.get("empty_documents"):
        probs.append(f"{rd['empty_documents']} empty documents skipped")
    if rd.get("skipped_files"):
        probs.append(f"{len(rd['skipped_files'])} files of unknown type skipped (e.g. {rd['skipped_files'][0]})")
    lines.append("read problems   " + ("; ".join(probs) if probs else "none"))
    lines.append(f"fingerprint     {m['fingerprint']}" + ("  (all shards re-hashed: OK)" if verify else ""))
    return "\n".join(lines)


def run_info(args) -> int:
    import json

    if args.json:
        from spectra.data.manifest import read_manifest

        print(json.dumps(read_manifest(args.dir), indent=2))
        return 0
    print(describe(args.dir, verify=args.verify))
    return 0
