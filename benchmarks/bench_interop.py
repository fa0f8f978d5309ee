"""Interop benchmark: import / verify / export a SpectraSuite-shaped TriLM, GGUF sizes, llama.cpp speed.

A random TriLM of a Spectra shape (default 99m: 512/1280/8 heads/16 layers, vocab 50304,
GPT-NeoX-20B tokenizer from the shared data pack) is written like the release (fp16,
2 safetensors shards), then timed through ``spectra import``, ``verify-ternary``,
``export --to hf`` and ``export --to gguf`` for each type. Each GGUF is loaded in
llama.cpp (llama-cpp-python, 2 threads) for a prefill + greedy decode timing; speed
ratios are against F16 measured in the same run. Appends a row to benchmarks/RESULTS.md.

    python benchmarks/bench_interop.py [--shape 99m|micro] [--prefill 64] [--decode 32] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_summary as _cpu_summary  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
TOKENIZER = (REPO / ".." / "shared" / "data" / "tokenizer" / "gpt-neox-20b.json").resolve()


def cpu_summary() -> str:
    return _cpu_summary(("avx2", "avx512f", "avx512_vnni", "avx512_bf16"))


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn, *a, **kw):
    t = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t


def llama_speed(path: Path, prefill: int, decode: int) -> tuple[float, float]:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(path), n_ctx=prefill + decode + 8, n_threads=2, logits_all=True, verbose=False)
    try:
        prompt = [int(x) for x in np.random.default_rng(0).integers(2, 50000, prefill)]
        _, tp = timed(llm.eval, prompt)
        t = time.perf_counter()
        for _ in range(decode):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        td = time.perf_counter() - t
        return prefill / tp, decode / td
    finally:
        llm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="99m", help="preset whose shape to use (99m, 190m, micro, ...)")
    ap.add_argument("--types", default="f16,q8_0,tq2_0,tq1_0")
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()

    import torch

    from spectra.config import get_preset
    from spectra.interop.gguf_export import export_gguf
    from spectra.interop.hf import export_hf, import_hf
    sys.path.insert(0, str(REPO / "tests"))  # test helpers: not part of the package
    from helpers.release_dirs import write_release_dir
    from spectra.interop.verify import verify_dir

    torch.set_num_threads(2)
    cfg = get_preset(args.shape).model
    use_neox = cfg.vocab_size >= 50277 and TOKENIZER.exists()
    load_before = load_avg()
    rows, figs = [], []
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        src, t_w = timed(write_release_dir, d / "release", cfg, seed=0, shards=2)
        if use_neox:
            (src / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
        conv, t_imp = timed(import_hf, src, d / "ours")
        rep, t_ver = timed(verify_dir, d / "ours")
        _, t_hf = timed(export_hf, d / "ours", d / "hf")
        figs.append(f"write release {t_w:.1f}s, import (recover+verify {len(conv.layouts)} matrices) {t_imp:.1f}s, "
                    f"verify-ternary {t_ver:.1f}s ({'PASS' if rep.ok else 'FAIL'}), export hf {t_hf:.1f}s")
        print(figs[0])
        if not use_neox:
            print("no NeoX tokenizer for this vocab: GGUF export and llama.cpp timings skipped")
        else:
            speeds = {}
            for qt in args.types.split(","):
                res, t_g = timed(export_gguf, d / "ours", d / f"m-{qt}.gguf", qtype=qt)
                try:
                    pp, dec = llama_speed(d / f"m-{qt}.gguf", args.prefill, args.decode)
                except ImportError:
                    pp = dec = float("nan")
                speeds[qt] = (pp, dec)
                rows.append((qt, t_g, res.nbytes / 1e6, pp, dec, len(res.fallbacks)))
            base = speeds.get("f16", (float("nan"),) * 2)
            print(f"{'type':6} {'export s':>8} {'MB':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode vs F16':>13}")
            for qt, t_g, mb, pp, dec, nfb in rows:
                print(f"{qt:6} {t_g:8.1f} {mb:8.1f} {pp:14.1f} {dec:13.1f} {dec / base[1]:12.2f}x")
                figs.append(f"{qt}: export {t_g:.1f}s, {mb:.1f} MB, prefill {pp:.0f} tok/s, decode {dec:.1f} tok/s "
                            f"({dec / base[1]:.2f}x F16)" + (f", {nfb} F16 fallbacks" if nfb else ""))
    load_after = load_avg()
    print(f"load {load_before} -> {load_after}")
    if not args.no_record:
        cmd = "python benchmarks/bench_interop.py " + " ".join(sys.argv[1:])
        when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(f"| {when} | interop | {cpu_summary()}, Python {platform.python_version()}, llama.cpp 2 threads | "
                    f"{load_before} -> {load_after} | `{cmd.strip()}` | random TriLM, {args.shape} shape "
                    f"({cfg.dim}/{cfg.ffn_dim}/{cfg.n_heads}h/{cfg.n_layers}L, vocab {cfg.vocab_size}, mp {cfg.mp}); "
                    f"prefill {args.prefill}, decode {args.decode}: " + "; ".join(figs) + " |\n")
        print(f"appended a row to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
