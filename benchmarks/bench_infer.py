"""Packed ternary inference speed: our native engine vs PyTorch fp32 vs llama.cpp (TQ2_0 / TQ1_0).

Everything in one run, same weights, same thread count: for each shape (Spectra 99m and 390m
by default) a random TriLM checkpoint (fp16, gamma*W_hat per shard, fp16-exact gammas) is
written once, packed with ``spectra pack`` (t2, t1) and exported to GGUF with spectra's own
exporter (``spectra.interop.gguf_export``: TQ2_0 / TQ1_0, same head precision as ours).
Each engine runs in its own subprocess (clean resident-memory figures, no cross-talk):

* prefill: a 128-token prompt from an empty cache (best of --reps; medians are recorded too)
* decode: 128 single-token steps after a 1-token prompt (best of --reps)
* resident memory: RSS growth of the process from before loading to after the runs
* roofline: bytes read per decoded token x tokens/s / measured read bandwidth (same threads)

Appends one row to benchmarks/RESULTS.md. Usage:
    python benchmarks/bench_infer.py [--shapes 99m,390m] [--head f16|q8] [--threads 2] [--reps 3]

AVX2-only comparison on an AVX-512 machine (what a Zen 3 would run): force our AVX2 path with
``--kernel avx2`` and put an AVX2-only llama.cpp first on the path (the row records its
system info):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
      pip install --no-deps --target build/llama_avx2 llama-cpp-python==0.3.36
    PYTHONPATH=build/llama_avx2 python benchmarks/bench_infer.py --kernel avx2 --acts int8x2,int8 --no-torch
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = (REPO / ".." / "shared" / "data" / "tokenizer" / "gpt-neox-20b.json").resolve()
N_PROMPT, N_DECODE = 128, 128


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def prompt_ids(vocab: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(1).integers(1, min(vocab, 50000), N_PROMPT)]


# ----------------------------------------------------------------------------- model files
def make_checkpoint(out: Path, preset: str, seed: int = 0) -> Path:
    """Random TriLM in the released layout: fp16 gamma*W_hat, per-shard gamma (fp16-exact)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from spectra.checkpoint import hf_config, to_hf_names
    from spectra.config import get_preset
    from spectra.infer.packed_model import linear_names
    from spectra.ternary import split_of

    if (out / "config.json").exists():
        return out
    cfg = get_preset(preset).model
    rng = np.random.default_rng(seed)
    sd = {}
    for name in linear_names(cfg):
        rows, k = ((cfg.ffn_dim, cfg.dim) if name.endswith(("gate_proj", "up_proj")) else
                   (cfg.dim, cfg.ffn_dim) if name.endswith("down_proj") else (cfg.dim, cfg.dim))
        q = rng.choice(np.array([-1, 0, 1], np.int8), size=(rows, k), p=[0.3, 0.4, 0.3])
        g = np.float16(rng.uniform(0.01, 0.04, cfg.mp)).astype(np.float32)
        if split_of(name) == "col":
            w = q.reshape(cfg.mp, rows // cfg.mp, k) * g[:, None, None]
        else:
            w = q.reshape(rows, cfg.mp, k // cfg.mp) * g[None, :, None]
        sd[f"{name}.weight"] = torch.from_numpy(w.reshape(rows, k).astype(np.float16))
    sd["embed_tokens.weight"] = torch.from_numpy((rng.standard_normal((cfg.vocab_size, cfg.dim), np.float32) * 0.02).astype(np.float16))
    sd["lm_head.weight"] = torch.from_numpy((rng.standard_normal((cfg.vocab_size, cfg.dim), np.float32) * 0.02).astype(np.float16))
    for i in range(cfg.n_layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            sd[f"layers.{i}.{n}.weight"] = torch.from_numpy((1 + 0.1 * rng.standard_normal(cfg.dim, np.float32)).astype(np.float16))
    sd["norm.weight"] = torch.ones(cfg.dim, dtype=torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(to_hf_names(sd), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg, "trilm", torch.float16), indent=2))
    if TOKENIZER.exists():
        shutil.copyfile(TOKENIZER, tmp / "tokenizer.json")
    tmp.rename(out)
    return out


def prepare(work: Path, preset: str, head: str) -> dict:
    from spectra.infer.packed_model import is_packed_dir, write_packed

    ck = make_checkpoint(work / f"{preset}-ckpt", preset)
    files = {"ckpt": ck}
    for fmt in ("t2", "t1"):
        p = work / f"{preset}-{fmt}-{head}"
        if not is_packed_dir(p):
            write_packed(ck, p, fmt, head, progress=False)
        files[fmt] = p
    gg_head = {"f16": "f16", "q8": "q8_0"}[head]
    for qt in ("tq2_0", "tq1_0"):
        g = work / f"{preset}-{qt}-{gg_head}.gguf"
        if not g.exists():
            try:
                from spectra.interop.gguf_export import export_gguf

                export_gguf(ck, g, qtype=qt, head_type=gg_head, embed_type="f16")
            except Exception as e:  # noqa: BLE001 - reported in the table, the rest still runs
                files[qt] = f"GGUF export failed: {type(e).__name__}: {e}"
                continue
        files[qt] = g
    return files


# ----------------------------------------------------------------------------- workers (subprocesses)
def _time_engine(reset, feed, vocab: int, reps: int) -> dict:
    ids = prompt_ids(vocab)
    reset(); feed(ids[:8])  # warm-up: page in weights, spin up threads
    pre, dec = [], []
    for _ in range(reps):
        reset()
        t = time.perf_counter(); feed(ids); pre.append(time.perf_counter() - t)
        reset(); feed(ids[:1])
        tok = ids[1]
        t = time.perf_counter()
        for i in range(N_DECODE):
            feed([ids[(i + 2) % len(ids)]])
        dec.append(time.perf_counter() - t)
        del tok
    # best of the repetitions: on a shared machine, interference only ever slows a run down
    return {"prefill_tps": N_PROMPT / min(pre), "decode_tps": N_DECODE / min(dec),
            "prefill_median": N_PROMPT / statistics.median(pre), "decode_median": N_DECODE / statistics.median(dec),
            "prefill_runs": [round(N_PROMPT / p, 1) for p in pre], "decode_runs": [round(N_DECODE / d, 1) for d in dec]}


def worker(args) -> None:
    r0 = rss_bytes()
    if args.worker == "native":
        from spectra.infer.engine import NativeEngine
        from spectra.infer.packed_model import PackedModel

        pm = PackedModel.load(args.model, verify=False)
        eng = NativeEngine(pm, max_len=N_PROMPT + N_DECODE + 16, n_threads=args.threads, kernel=args.kernel,
                           max_batch=N_PROMPT, act=args.act)
        out = _time_engine(eng.reset, eng.forward, pm.cfg.vocab_size, args.reps)
        c = pm.cfg
        out["kv_bytes"] = 2 * c.n_layers * c.dim * eng.max_len * 4
        out["file_bytes"] = pm.file_bytes
        emb = pm.arrays["embed_tokens.weight"].nbytes
        out["bytes_per_token"] = pm.file_bytes - emb + c.dim * 2 + 2 * c.n_layers * c.dim * 4 * (N_DECODE // 2 + 1)
        out["engine"] = eng.describe()
        assert "torch" not in sys.modules, "the native path must not import torch"
    elif args.worker == "torch":
        from spectra.infer.engine import TorchEngine, reference_model
        from spectra.infer.packed_model import PackedModel

        pm = PackedModel.load(args.model, verify=False)
        eng = TorchEngine(reference_model(pm), max_len=N_PROMPT + N_DECODE + 16, n_threads=args.threads)
        out = _time_engine(eng.reset, eng.forward, pm.cfg.vocab_size, args.reps)
        out["engine"] = eng.describe()
    else:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(args.model), n_ctx=N_PROMPT + N_DECODE + 16, n_batch=N_PROMPT,
                              n_ubatch=N_PROMPT, n_threads=args.threads, n_threads_batch=args.threads,
                              verbose=False, logits_all=False)
        out = _time_engine(llm.reset, llm.eval, llm.n_vocab(), args.reps)
        import gguf

        rd = gguf.GGUFReader(str(args.model))
        tb = {t.name: int(t.n_bytes) for t in rd.tensors}
        c = {k: v for k, v in ((f.name, f) for f in rd.fields.values())}
        dim = int(c["llama.embedding_length"].parts[-1][0])
        layers = int(c["llama.block_count"].parts[-1][0])
        out["bytes_per_token"] = sum(tb.values()) - tb["token_embd.weight"] + dim * 2 + 2 * layers * dim * 2 * (N_DECODE // 2 + 1)
        out["file_bytes"] = Path(args.model).stat().st_size
        out["engine"] = f"llama.cpp {llama_cpp.__version__} ({llama_cpp.llama_print_system_info().decode().strip()})"
    out["rss_growth"] = rss_bytes() - r0
    print("RESULT " + json.dumps(out))


def run_worker(kind: str, model, threads: int, reps: int, extra: list[str] = (), timeout: int = 1800) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--threads", str(threads),
           "--reps", str(reps), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def read_bandwidth(threads: int) -> float:
    import numpy as np

    from spectra.infer.kernels.build import load_library

    lib = load_library()
    buf = np.ones(1 << 30, dtype=np.uint8)  # 1 GiB: far beyond the caches
    lib.spx_read_sum(buf.ctypes.data, buf.nbytes, threads, 1)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        lib.spx_read_sum(buf.ctypes.data, buf.nbytes, threads, 2)
        best = max(best, 2 * buf.nbytes / (time.perf_counter() - t))
    return best


def machine() -> str:
    model, flags = "?", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    keep = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni") if f in flags]
    return f"{model} x{os.cpu_count()} ({' '.join(keep)}), Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="99m,390m")
    ap.add_argument("--head", default="f16", choices=["f16", "q8"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch-reps", type=int, default=1)
    ap.add_argument("--acts", default="int8x2,int8", help="native activation modes to measure")
    ap.add_argument("--kernel", default=None, help="native kernel path (default: best)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "spectra-bench-infer"), help="where model files are cached")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--act", default="int8x2", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t_start = time.time()
    bw = read_bandwidth(args.threads)
    print(f"read bandwidth ({args.threads} threads): {bw / 1e9:.1f} GB/s")
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError as e:
        have_llama, llama_note = False, f"llama-cpp-python not importable ({e})"
    rows, notes = [], []
    for shape in args.shapes.split(","):
        print(f"[{shape}] preparing model files in {work} ...", flush=True)
        files = prepare(work, shape, args.head)
        runs = []
        for fmt in ("t2", "t1"):
            for act in args.acts.split(","):
                extra = ["--act", act] + (["--kernel", args.kernel] if args.kernel else [])
                runs.append((f"ours {fmt} {act}", run_worker("native", files[fmt], args.threads, args.reps, extra)))
                print(f"  {runs[-1][0]}: {runs[-1][1]}", flush=True)
        if have_llama:
            for qt in ("tq2_0", "tq1_0"):
                if isinstance(files[qt], str):
                    runs.append((f"llama.cpp {qt.upper()}", {"error": files[qt]}))
                else:
                    runs.append((f"llama.cpp {qt.upper()}", run_worker("llama", files[qt], args.threads, args.reps)))
                print(f"  {runs[-1][0]}: {runs[-1][1]}", flush=True)
        else:
            notes.append(llama_note)
        if not args.no_torch:
            runs.append(("pytorch fp32", run_worker("torch", files["t2"], args.threads, args.torch_reps)))
            print(f"  {runs[-1][0]}: {runs[-1][1]}", flush=True)
        rows.append((shape, runs))

    # ---- table
    print(f"\nhead {args.head}, {args.threads} threads, prompt {N_PROMPT}, decode {N_DECODE}; read BW {bw / 1e9:.1f} GB/s")
    hdr = f"{'shape':6} {'engine':22} {'prefill tok/s':>13} {'decode tok/s':>12} {'vs TQ2_0 (pre/dec)':>19} {'file MB':>8} {'RSS+ MB':>8} {'roofline':>8}"
    print(hdr)
    print("-" * len(hdr))
    figures = []
    for shape, runs in rows:
        ref = dict(runs).get("llama.cpp TQ2_0", {})
        for name, r in runs:
            if "error" in r:
                print(f"{shape:6} {name:22} ERROR {r['error']}")
                figures.append(f"{shape} {name}: error ({r['error'][:80]})")
                continue
            rp = f"{r['prefill_tps'] / ref['prefill_tps']:.2f}x" if ref.get("prefill_tps") else "-"
            rd = f"{r['decode_tps'] / ref['decode_tps']:.2f}x" if ref.get("decode_tps") else "-"
            roof = r["bytes_per_token"] * r["decode_tps"] / bw if "bytes_per_token" in r else None
            mem = ""
            if "kv_bytes" in r:
                mem = f" RSS+ {r['rss_growth'] / 1e6:.0f} MB = {r['rss_growth'] / (r['file_bytes'] + r['kv_bytes']):.2f}x (file+KV)"
            print(f"{shape:6} {name:22} {r['prefill_tps']:13.1f} {r['decode_tps']:12.1f} {rp + ' / ' + rd:>19} "
                  f"{r.get('file_bytes', 0) / 1e6:8.1f} {r['rss_growth'] / 1e6:8.0f} {'' if roof is None else f'{roof:8.0%}'}")
            figures.append(f"{shape} {name}: prefill {r['prefill_tps']:.0f} tok/s, decode {r['decode_tps']:.1f} tok/s"
                           + (f" ({rp}/{rd} of TQ2_0)" if ref and name != "llama.cpp TQ2_0" else "")
                           + (f", roofline {roof:.0%}" if roof is not None else "") + mem)
    load1 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload before/after: {load0} -> {load1}; wall {time.time() - t_start:.0f}s")
    for n in notes:
        print("note:", n)
    if not args.no_record:
        eng = next((r["engine"] for _, rs in rows for n, r in rs if n.startswith("llama") and "engine" in r), "llama.cpp: n/a")
        ours = next((r["engine"] for _, rs in rows for n, r in rs if n.startswith("ours") and "engine" in r), "")
        cmd = "python benchmarks/bench_infer.py " + " ".join(a for a in sys.argv[1:])
        row = (f"| {datetime.datetime.now():%Y-%m-%d %H:%M} | infer | {machine()} | {load0} -> {load1} | `{cmd.strip()}` | "
               f"head {args.head}, {args.threads} threads, 128-token prefill / 128-token decode, best of {args.reps}; "
               f"read BW {bw / 1e9:.1f} GB/s; ours: {ours}; {eng}. " + "; ".join(figures)
               + ("; " + "; ".join(notes) if notes else "") + " |\n")
        res = REPO / "benchmarks" / "RESULTS.md"
        if not res.exists():
            res.write_text("# Benchmark results\n\n| date | area | machine | load (1/5/15 min) | command | figures |\n|---|---|---|---|---|---|\n")
        with open(res, "a") as f:
            f.write(row)
        print(f"recorded in {res}")


if __name__ == "__main__":
    main()
