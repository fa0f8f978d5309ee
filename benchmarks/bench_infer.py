"""Packed ternary inference speed: our native engine vs llama.cpp (TQ2_0 / TQ1_0), ik_llama.cpp
(IQ2_BN_R4 / IQ2_BN) and PyTorch fp32.

Everything in one run, same weights, same thread count: for each shape (Spectra 99m and 390m
by default) a random TriLM checkpoint (fp16, gamma*W_hat per shard, fp16-exact gammas) is
written once, packed with ``spectra pack`` (t2, t1) and exported to GGUF with spectra's own
exporter (``spectra.interop.gguf_export``: TQ2_0 / TQ1_0, same head precision as ours).
Each engine runs in its own subprocess (clean resident-memory figures, no cross-talk), and the
repetitions are alternated between engines (rep 1 of every engine, then rep 2, ...), so slow
phases of a shared machine hit everyone; each figure is the best of --reps (medians recorded too):

* prefill: a 128-token prompt from an empty cache
* decode: 128 single-token steps after a 1-token prompt
* resident memory: RSS growth of the process from before loading to after the runs
* roofline: bytes read per decoded token x tokens/s / measured read bandwidth (same threads)

ik_llama.cpp (``--ik-llama SRC``, its source tree, e.g. github ikawrakow/ik_llama.cpp): the setup
step builds llama-quantize and llama-bench once into build/ik_llama (cmake flags in IK_CMAKE; ~25
min on 2 cores, cached), converts the HF checkpoint with a patched copy of its
convert_hf_to_gguf.py (its LlamaModel.set_gguf_parameters reads num_experts_per_tok /
prefix_dense_intermediate_size unconditionally), quantizes with ``llama-quantize --pure
--output-tensor-type f16 --token-embedding-type f16`` to IQ2_BN_R4 and IQ2_BN, and times
``llama-bench -t THREADS -p 128 -n 128 -r 1`` per repetition.

``--contention``: decode only, quiet and busy runs alternated per engine, "busy" = one extra
process spinning on one CPU; prints each engine's busy/quiet decode ratio (ours: goal >= 45%).

Appends one row to benchmarks/RESULTS.md. Usage:
    python benchmarks/bench_infer.py [--shapes 99m,390m] [--head f16|q8] [--threads 2] [--reps 3]
        [--ik-llama ~/src/ik_llama.cpp] [--contention] [--no-torch]
    python benchmarks/bench_infer.py --smoke      # tiny shape, 1 rep, nothing recorded: checks the wiring
    python benchmarks/bench_infer.py --matmul     # prefill matmul of every kernel path, int8 vs int8x2 (CPU time)

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
    if TOKENIZER.exists() and tokenizer_fits(TOKENIZER, cfg.vocab_size):  # the GGUF exporters need one
        shutil.copyfile(TOKENIZER, tmp / "tokenizer.json")
    tmp.rename(out)
    return out


def tokenizer_fits(path: Path, vocab: int) -> bool:
    """Every token id of a tokenizer.json < vocab (small presets have fewer embedding rows than gpt-neox-20b)."""
    tok = json.loads(path.read_text())
    ids = list((tok.get("model") or {}).get("vocab", {}).values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids, default=0) < vocab


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
def _time_engine(reset, feed, vocab: int, reps: int, decode_only: bool = False) -> dict:
    ids = prompt_ids(vocab)
    reset(); feed(ids[:8])  # warm-up: page in weights, spin up threads
    pre, dec = [], []
    for _ in range(reps):
        reset()
        if not decode_only:
            t = time.perf_counter(); feed(ids); pre.append(time.perf_counter() - t)
        reset(); feed(ids[:1])
        tok = ids[1]
        t = time.perf_counter()
        for i in range(N_DECODE):
            feed([ids[(i + 2) % len(ids)]])
        dec.append(time.perf_counter() - t)
        del tok
    return {"prefill_runs": [round(N_PROMPT / p, 1) for p in pre], "decode_runs": [round(N_DECODE / d, 1) for d in dec]}


def worker(args) -> None:
    r0 = rss_bytes()
    if args.worker == "native":
        from spectra.infer.engine import NativeEngine
        from spectra.infer.packed_model import PackedModel

        pm = PackedModel.load(args.model, verify=False)
        eng = NativeEngine(pm, max_len=N_PROMPT + N_DECODE + 16, n_threads=args.threads, kernel=args.kernel,
                           max_batch=N_PROMPT, act=args.act)
        out = _time_engine(eng.reset, eng.forward, pm.cfg.vocab_size, args.reps, args.decode_only)
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
        out = _time_engine(eng.reset, eng.forward, pm.cfg.vocab_size, args.reps, args.decode_only)
        out["engine"] = eng.describe()
    else:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(args.model), n_ctx=N_PROMPT + N_DECODE + 16, n_batch=N_PROMPT,
                              n_ubatch=N_PROMPT, n_threads=args.threads, n_threads_batch=args.threads,
                              verbose=False, logits_all=False)
        out = _time_engine(llm.reset, llm.eval, llm.n_vocab(), args.reps, args.decode_only)
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


def run_worker(kind: str, model, threads: int, reps: int, extra: list[str] = (), timeout: int = 1800,
               decode_only: bool = False) -> dict:
    if kind == "ik":
        return run_ik_bench(model, threads, extra, decode_only, timeout)
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--threads", str(threads),
           "--reps", str(reps), *extra, *(["--decode-only"] if decode_only else [])]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}


# ----------------------------------------------------------------------------- ik_llama.cpp peer
IK_CMAKE = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DLLAMA_CURL=OFF", "-DGGML_CCACHE=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_IQK_FA_ALL_QUANTS=OFF"]
IK_TYPES = ("IQ2_BN_R4", "IQ2_BN")
# its LlamaModel.set_gguf_parameters (2026-08 head) swaps in keys of another architecture unconditionally
IK_BAD = """        saved_intermediate_size = self.hparams.get("intermediate_size")
        saved_num_experts_per_tok = self.hparams.pop("num_experts_per_tok")
        self.hparams["intermediate_size"] = self.hparams["prefix_dense_intermediate_size"]
        super().set_gguf_parameters()
        self.hparams["intermediate_size"] = saved_intermediate_size
        self.hparams["num_experts_per_tok"] = saved_num_experts_per_tok
"""


def ik_patch_converter(text: str) -> str:
    """Guard the stray block (plain Llama configs have neither key); unchanged if already fixed upstream."""
    if IK_BAD not in text:
        return text
    guarded = "".join("    " + line if line.strip() else line for line in IK_BAD.splitlines(keepends=True))
    return text.replace(IK_BAD, '        if "prefix_dense_intermediate_size" in self.hparams:  # patched by spectra bench_infer\n'
                        + guarded + "        else:\n            super().set_gguf_parameters()\n", 1)


def ik_setup(src: Path, out: Path, dry: bool = False) -> dict:
    """Build ik_llama.cpp's llama-quantize and llama-bench once (cached in out/build) and write a patched
    copy of its converter next to them. Returns the tool paths; raises RuntimeError with the log tail."""
    src, bdir = src.resolve(), out / "build"
    tools = {"quantize": bdir / "bin" / "llama-quantize", "bench": bdir / "bin" / "llama-bench",
             "convert": out / "convert_hf_to_gguf.py", "gguf_py": src / "gguf-py"}
    if not (src / "CMakeLists.txt").exists() or not (src / "convert_hf_to_gguf.py").exists():
        raise RuntimeError(f"{src} is not an ik_llama.cpp source tree (no CMakeLists.txt / convert_hf_to_gguf.py)")
    steps = [["cmake", "-S", str(src), "-B", str(bdir), *IK_CMAKE],
             ["cmake", "--build", str(bdir), "--target", "llama-quantize", "llama-bench", "-j", str(os.cpu_count() or 2)]]
    if dry:
        print("ik_llama.cpp setup:\n  " + "\n  ".join(" ".join(c) for c in steps))
        return tools
    out.mkdir(parents=True, exist_ok=True)
    if not (tools["quantize"].exists() and tools["bench"].exists()):
        for cmd in steps:
            print("  $", " ".join(cmd), flush=True)
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=4 * 3600)
            if r.returncode:
                raise RuntimeError(f"{' '.join(cmd[:3])} failed: {(r.stderr or r.stdout)[-800:]}")
    text = ik_patch_converter((src / "convert_hf_to_gguf.py").read_text())
    tmp = tools["convert"].with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, tools["convert"])
    return tools


def ik_prepare(tools: dict, ckpt: Path, work: Path, preset: str, types=IK_TYPES) -> dict:
    """HF checkpoint -> f16 GGUF (its converter) -> IQ2_BN_R4 / IQ2_BN (f16 embedding and head)."""
    f16 = work / f"{preset}-ik-f16.gguf"
    env = dict(os.environ, PYTHONPATH=str(tools["gguf_py"]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    files = {}
    if not f16.exists():
        r = subprocess.run([sys.executable, str(tools["convert"]), str(ckpt), "--outtype", "f16", "--outfile", str(f16) + ".tmp"],
                           capture_output=True, text=True, timeout=3600, env=env)
        if r.returncode:
            return {t: f"ik convert failed: {(r.stderr or r.stdout).strip().splitlines()[-1][:200]}" for t in types}
        os.replace(str(f16) + ".tmp", f16)
    for t in types:
        g = work / f"{preset}-ik-{t.lower()}.gguf"
        if not g.exists():
            r = subprocess.run([str(tools["quantize"]), "--pure", "--output-tensor-type", "f16", "--token-embedding-type", "f16",
                                str(f16), str(g) + ".tmp", t], capture_output=True, text=True, timeout=3600)
            if r.returncode:
                files[t] = f"ik quantize {t} failed: {(r.stderr or r.stdout).strip().splitlines()[-1][:200]}"
                continue
            os.replace(str(g) + ".tmp", g)
        files[t] = g
    return files


def run_ik_bench(model, threads: int, extra, decode_only: bool, timeout: int) -> dict:
    """One llama-bench repetition (its own warm-up first); figures in our worker's format."""
    bench = Path(extra[0])
    cmd = [str(bench), "-m", str(model), "-t", str(threads), "-p", "0" if decode_only else str(N_PROMPT),
           "-n", str(N_DECODE), "-r", "1", "-o", "json"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rows = json.loads(r.stdout[r.stdout.index("["): r.stdout.rindex("]") + 1])
    except (ValueError, subprocess.TimeoutExpired) as e:
        return {"error": f"llama-bench: {type(e).__name__}: {(getattr(r, 'stderr', '') or str(e))[-200:]}"}
    out = {"prefill_runs": [], "decode_runs": [], "file_bytes": Path(model).stat().st_size, "rss_growth": 0,
           "engine": f"ik_llama.cpp {rows[0].get('build_commit', '?')} ({rows[0].get('cpu_info', '')})"}
    for row in rows:
        tps = max(row.get("samples_ts") or [row["avg_ts"]])
        if row.get("n_gen", 0) and not row.get("n_prompt", 0):
            out["decode_runs"].append(round(tps, 1))
        elif row.get("n_prompt", 0) and not row.get("n_gen", 0):
            out["prefill_runs"].append(round(tps, 1))
    return out


def merge_runs(results: list[dict]) -> dict:
    """Repetitions of one engine -> best (on a shared machine interference only slows a run) and median."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1] if results else {"error": "not run"}
    out = dict(ok[0])
    for kind, n in (("prefill", N_PROMPT), ("decode", N_DECODE)):
        runs = [v for r in ok for v in r.get(f"{kind}_runs", [])]
        out[f"{kind}_runs"] = runs
        if runs:
            out[f"{kind}_tps"], out[f"{kind}_median"] = max(runs), statistics.median(runs)
    return out


def spinner(cpu: int) -> subprocess.Popen:
    """One extra process burning one CPU (the 'busy machine' of the contention mode)."""
    # it stops by itself when this process goes away (a killed benchmark must not leave a CPU burner behind)
    code = (f"import os\ntry:\n    os.sched_setaffinity(0, {{{cpu}}})\nexcept OSError:\n    pass\n"
            f"while os.getppid() == {os.getpid()}:\n    for _ in range(1000000):\n        pass\n")
    return subprocess.Popen([sys.executable, "-c", code])


def contention(engines: list, threads: int, reps: int) -> list[str]:
    """Per engine: decode-only runs, quiet and busy (one spinning process) alternated; busy/quiet of the best."""
    cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    lines = []
    for name, kind, model, extra in engines:
        quiet, busy = [], []
        for _ in range(reps):
            quiet.append(run_worker(kind, model, threads, 1, extra, decode_only=True))
            sp = spinner(cpu)
            try:
                busy.append(run_worker(kind, model, threads, 1, extra, decode_only=True))
            finally:
                sp.kill()
                sp.wait()
        q, b = merge_runs(quiet), merge_runs(busy)
        if "decode_tps" not in q or "decode_tps" not in b:
            lines.append(f"{name}: error ({q.get('error') or b.get('error')})")
        else:
            lines.append(f"{name}: decode quiet {q['decode_tps']:.1f} tok/s, busy {b['decode_tps']:.1f} tok/s, "
                         f"busy/quiet {b['decode_tps'] / q['decode_tps']:.0%}")
        print("  contention", lines[-1], flush=True)
    return lines


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


def matmul_micro(kernels: list[str], reps: int, T: int = N_PROMPT) -> list[str]:
    """Prefill matmul microbenchmark: every kernel path x int8 / int8x2 on 99m/390m matrix shapes, 1 thread,
    alternated, best of reps in CPU time (process_time: a busy machine's waits are not counted)."""
    import ctypes

    import numpy as np

    from spectra.infer.engine import _mat_struct, matrix_from_ternary
    from spectra.infer.kernels.build import kernel_id, load_library

    lib, rng, lines = load_library(), np.random.default_rng(0), []
    for rows, k in ((1280, 512), (512, 1280), (2560, 1024), (1024, 2560)):
        m = matrix_from_ternary(rng.choice(np.array([-1, 0, 1], np.int8), size=(rows, k)), np.full(1, 0.02, np.float32), "col", "t2")
        st, x = _mat_struct(m, []), rng.normal(size=(T, k)).astype(np.float32)
        out = np.empty((T, rows), np.float32)
        best = {(kn, nl): float("inf") for kn in kernels for nl in (1, 2)}
        for _ in range(reps):
            for kn in kernels:
                for nl in (1, 2):
                    t = time.process_time()
                    rc = lib.spx_matmul(ctypes.byref(st), x.ctypes.data, T, out.ctypes.data, 1, kernel_id(kn), nl)
                    best[(kn, nl)] = min(best[(kn, nl)], time.process_time() - t)
                    assert rc == 0, rc
        gm = {key: T * rows * k / v / 1e9 for key, v in best.items()}
        lines.append(f"{rows}x{k} T={T}: " + "; ".join(
            f"{kn} int8 {gm[(kn, 1)]:.0f} / int8x2 {gm[(kn, 2)]:.0f} GMAC/s (x2 time {best[(kn, 2)] / best[(kn, 1)]:.2f})" for kn in kernels))
        print("  " + lines[-1], flush=True)
    return lines


def plan_engines(files: dict, args, have_llama: bool, ik_files: dict) -> tuple[list, list]:
    """(engines to time, rows that already failed): engine = (name, worker kind, model file, extra args)."""
    engines, failed = [], []
    for fmt in ("t2", "t1"):
        for act in args.acts.split(","):
            extra = ["--act", act] + (["--kernel", args.kernel] if args.kernel else [])
            engines.append((f"ours {fmt} {act}", "native", files[fmt], extra))
    if have_llama:
        for qt in ("tq2_0", "tq1_0"):
            name = f"llama.cpp {qt.upper()}"
            (failed.append((name, {"error": files[qt]})) if isinstance(files[qt], str) else
             engines.append((name, "llama", files[qt], [])))
    for t, f in ik_files.items():
        name = f"ik_llama {t}"
        (failed.append((name, {"error": f})) if isinstance(f, str) else
         engines.append((name, "ik", f, [str(args.ik_tools["bench"])])))
    if not args.no_torch:
        engines.append(("pytorch fp32", "torch", files["t2"], []))
    return engines, failed


def time_alternated(engines: list, args) -> list:
    """Repetition r of every engine before repetition r + 1 of any: slow phases of a shared machine hit all."""
    results = {e[0]: [] for e in engines}
    for rep in range(args.reps):
        for name, kind, model, extra in engines:
            if kind == "torch" and rep >= args.torch_reps:
                continue
            results[name].append(run_worker(kind, model, args.threads, 1, extra))
            print(f"  rep {rep + 1} {name}: {results[name][-1]}", flush=True)
    return [(name, merge_runs(results[name])) for name, *_ in engines]


def print_table(rows, args, bw: float) -> list[str]:
    print(f"\nhead {args.head}, {args.threads} threads, prompt {N_PROMPT}, decode {N_DECODE}; read BW {bw / 1e9:.1f} GB/s")
    hdr = (f"{'shape':6} {'engine':22} {'prefill tok/s':>13} {'decode tok/s':>12} {'vs TQ2_0 (pre/dec)':>19} "
           f"{'vs IQ2_BN_R4':>13} {'file MB':>8} {'RSS+ MB':>8} {'roofline':>8}")
    print(hdr)
    print("-" * len(hdr))
    figures = []
    for shape, runs in rows:
        refs = {k: dict(runs).get(k, {}) for k in ("llama.cpp TQ2_0", "ik_llama IQ2_BN_R4")}
        for name, r in runs:
            if "error" in r or "decode_tps" not in r:
                err = r.get("error", "no figures")
                print(f"{shape:6} {name:22} ERROR {err}")
                figures.append(f"{shape} {name}: error ({err[:80]})")
                continue
            vs = {}
            for k, ref in refs.items():
                rp = f"{r['prefill_tps'] / ref['prefill_tps']:.2f}x" if ref.get("prefill_tps") and r.get("prefill_tps") else "-"
                rd = f"{r['decode_tps'] / ref['decode_tps']:.2f}x" if ref.get("decode_tps") else "-"
                vs[k] = (rp, rd)
            roof = r["bytes_per_token"] * r["decode_tps"] / bw if "bytes_per_token" in r else None
            mem = ""
            if "kv_bytes" in r:
                mem = f" RSS+ {r['rss_growth'] / 1e6:.0f} MB = {r['rss_growth'] / (r['file_bytes'] + r['kv_bytes']):.2f}x (file+KV)"
            tq, ik = vs["llama.cpp TQ2_0"], vs["ik_llama IQ2_BN_R4"]
            print(f"{shape:6} {name:22} {r.get('prefill_tps', 0):13.1f} {r['decode_tps']:12.1f} {tq[0] + ' / ' + tq[1]:>19} "
                  f"{ik[0] + '/' + ik[1]:>13} {r.get('file_bytes', 0) / 1e6:8.1f} {r['rss_growth'] / 1e6:8.0f} "
                  f"{'' if roof is None else f'{roof:8.0%}'}")
            rel = "".join(f" ({v[0]}/{v[1]} of {k.split()[-1]})" for k, v in vs.items() if refs[k] and name != k)
            figures.append(f"{shape} {name}: prefill {r.get('prefill_tps', 0):.0f} tok/s, decode {r['decode_tps']:.1f} tok/s"
                           + rel + (f", roofline {roof:.0%}" if roof is not None else "") + mem)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="99m,390m")
    ap.add_argument("--head", default="f16", choices=["f16", "q8"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="alternated repetitions per engine; figures are the best")
    ap.add_argument("--torch-reps", type=int, default=1)
    ap.add_argument("--acts", default="int8x2,int8", help="native activation modes to measure")
    ap.add_argument("--kernel", default=None, help="native kernel path (default: best)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "spectra-bench-infer"), help="where model files are cached")
    ap.add_argument("--ik-llama", metavar="SRC", help="ik_llama.cpp source tree: adds IQ2_BN_R4 / IQ2_BN (built into build/ik_llama)")
    ap.add_argument("--ik-types", default=",".join(IK_TYPES))
    ap.add_argument("--contention", action="store_true", help="also: decode busy/quiet with one spinning process, per engine")
    ap.add_argument("--contention-reps", type=int, default=3)
    ap.add_argument("--matmul", action="store_true", help="only the prefill matmul microbenchmark of every kernel path")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="nano shape, 1 rep, int8x2 only, no torch, nothing recorded")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (and the ik_llama.cpp setup commands) and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--act", default="int8x2", help=argparse.SUPPRESS)
    ap.add_argument("--decode-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.shapes, args.reps, args.acts, args.no_torch, args.no_record = "nano", 1, "int8x2", True, True
        args.contention_reps = 1

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    try:
        import llama_cpp  # noqa: F401
        have_llama, notes = True, []
    except ImportError as e:
        have_llama, notes = False, [f"llama-cpp-python not importable ({e})"]
    args.ik_tools = None
    if args.ik_llama:
        args.ik_tools = ik_setup(Path(args.ik_llama).expanduser(), REPO / "build" / "ik_llama", dry=args.dry_run)
    if args.dry_run:
        print(f"shapes {args.shapes}; engines per shape: ours t2/t1 x {args.acts}"
              + (", llama.cpp TQ2_0/TQ1_0" if have_llama else "") + (f", ik_llama {args.ik_types}" if args.ik_llama else "")
              + ("" if args.no_torch else ", pytorch fp32") + f"; {args.reps} alternated reps, {args.threads} threads"
              + ("; contention mode" if args.contention else ""))
        return
    work.mkdir(parents=True, exist_ok=True)
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t_start = time.time()
    if args.matmul:
        from spectra.infer.kernels.build import available_kernels

        print(f"prefill matmul microbenchmark, 1 thread, best of {max(args.reps, 5)} (CPU time); load {load0}")
        matmul_micro(available_kernels(), max(args.reps, 5))
        return
    bw = read_bandwidth(args.threads)
    print(f"read bandwidth ({args.threads} threads): {bw / 1e9:.1f} GB/s")
    rows, cont = [], []
    for shape in args.shapes.split(","):
        print(f"[{shape}] preparing model files in {work} ...", flush=True)
        files = prepare(work, shape, args.head)
        ik_files = ik_prepare(args.ik_tools, files["ckpt"], work, shape, args.ik_types.split(",")) if args.ik_tools else {}
        engines, failed = plan_engines(files, args, have_llama, ik_files)
        rows.append((shape, time_alternated(engines, args) + failed))
        if args.contention:
            keep = {f"ours t2 {args.acts.split(',')[0]}", "llama.cpp TQ2_0", "ik_llama IQ2_BN_R4"}
            cont += [f"{shape} {line}" for line in contention([e for e in engines if e[0] in keep], args.threads, args.contention_reps)]

    figures = print_table(rows, args, bw)
    if cont:
        print("\ncontention (decode, one extra process spinning on one CPU; goal for ours >= 45%):")
        print("\n".join("  " + c for c in cont))
        figures.append("contention busy/quiet decode: " + "; ".join(cont))
    load1 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload before/after: {load0} -> {load1}; wall {time.time() - t_start:.0f}s")
    for n in notes:
        print("note:", n)
    if not args.no_record:
        eng = "; ".join(dict.fromkeys(r["engine"] for _, rs in rows for n, r in rs if not n.startswith(("ours", "pytorch")) and "engine" in r)) or "peers: n/a"
        ours = next((r["engine"] for _, rs in rows for n, r in rs if n.startswith("ours") and "engine" in r), "")
        cmd = "python benchmarks/bench_infer.py " + " ".join(a for a in sys.argv[1:])
        row = (f"| {datetime.datetime.now():%Y-%m-%d %H:%M} | infer | {machine()} | {load0} -> {load1} | `{cmd.strip()}` | "
               f"head {args.head}, {args.threads} threads, 128-token prefill / 128-token decode, best of {args.reps} alternated; "
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
