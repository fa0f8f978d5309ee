"""Serving throughput and latency: `spectra serve` (native engine) vs llama.cpp's llama-server, same weights.

For each shape (Spectra 99m and 390m by default; random ternary weights, written once by
bench_infer's ``make_checkpoint``) the checkpoint is packed (t2, f16 head) for us and
exported to GGUF TQ2_0 (f16 head and embedding) for llama.cpp with spectra's own exporter.
Both servers run as subprocesses on 127.0.0.1 with the same thread count:

* ours:        ``spectra serve PACKED --parallel 16 --threads T``
* llama.cpp:   ``llama-server -m GGUF -t T -tb T -cb --parallel 16 -c 16*CTX``, built with cmake
               (``-DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF``) from the llama.cpp sources vendored in
               the llama-cpp-python sdist (``pip download --no-deps --no-binary :all:``), cached in
               build/llama-server/ (ignored by git)

At each concurrency (1, 4, 16) that many client threads each send ``--requests`` streamed
completions (a ``--prompt``-token random prompt, ``--max-tokens`` generated with
ignore_eos, greedy). Recorded: aggregate generated tokens/s (all completion tokens / wall
time of the phase), p50/p99 time to first token and p50/p99 inter-token latency (gaps
between streamed tokens). Single-stream reference: ``spectra generate --json`` decode
tokens/s with the same threads. Goals (issue 16): at 16 streams our aggregate >= 3x our
single-stream rate and >= 1.5x llama-server's; single-stream decode through the server
>= 0.9x `spectra generate`.

Appends one row to benchmarks/RESULTS.md. Usage (a quiet machine; ~30-60 min with the build):
    python benchmarks/bench_serve.py [--shapes 99m,390m] [--threads 2] [--concurrency 1,4,16]
Smoke run (seconds, no llama.cpp):
    python benchmarks/bench_serve.py --shapes micro --concurrency 1,4 --requests 2 --max-tokens 8 --no-llama --no-record
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import machine, make_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "llama-server"


# ----------------------------------------------------------------------------- files and servers
def prepare(work: Path, shape: str, with_gguf: bool) -> dict:
    from spectra.infer.packed_model import is_packed_dir, write_packed

    ck = make_checkpoint(work / f"{shape}-ckpt", shape)
    packed = work / f"{shape}-t2-f16"
    if not is_packed_dir(packed):
        write_packed(ck, packed, "t2", "f16", progress=False)
    files = {"ckpt": ck, "packed": packed}
    if with_gguf:
        g = work / f"{shape}-tq2_0-f16.gguf"
        if not g.exists():
            from spectra.interop.gguf_export import export_gguf

            export_gguf(ck, g, qtype="tq2_0", head_type="f16", embed_type="f16")
        files["gguf"] = g
    return files


def build_llama_server(jobs: int = 2) -> Path:
    """llama-server from the llama.cpp sources vendored in the installed llama-cpp-python's sdist (cached)."""
    exe = BUILD / "bin" / "llama-server"
    if exe.exists():
        return exe
    try:
        import llama_cpp

        spec = f"llama-cpp-python=={llama_cpp.__version__}"
    except ImportError:
        spec = "llama-cpp-python"
    src = BUILD / "src"
    if not (src / "CMakeLists.txt").exists():
        dl = BUILD / "sdist"
        dl.mkdir(parents=True, exist_ok=True)
        if not list(dl.glob("llama_cpp_python-*.tar.gz")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec,
                            "-d", str(dl)], check=True, timeout=1800)
        tgz = sorted(dl.glob("llama_cpp_python-*.tar.gz"))[-1]
        tmp = BUILD / "extract"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(tgz) as tf:
            tf.extractall(tmp, filter="data")
        vendored = next(tmp.glob("*/vendor/llama.cpp"))
        shutil.rmtree(src, ignore_errors=True)
        vendored.rename(src)
        shutil.rmtree(tmp, ignore_errors=True)
    bdir = BUILD / "cmake"
    subprocess.run(["cmake", "-S", str(src), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF",
                    "-DGGML_CCACHE=OFF"], check=True, timeout=600)
    subprocess.run(["cmake", "--build", str(bdir), "--target", "llama-server", "-j", str(jobs)], check=True, timeout=7200)
    exe.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(bdir / "bin" / "llama-server", exe)
    return exe


class Server:
    """A server subprocess; ``base`` once /health answers 200."""

    def __init__(self, cmd: list[str], log: Path, port: int | None, env=None, timeout: float = 600):
        self.log = open(log, "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=env)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {log.read_text()[-2000:]}")
            if port is None:
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
                port = int(m.group(1)) if m else None
            if port is not None and _health(f"http://127.0.0.1:{port}"):
                break
            if time.time() - t0 > timeout:
                self.close()
                raise RuntimeError(f"server not ready after {timeout:.0f}s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        self.base = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _health(base: str) -> bool:
    import httpx

    try:
        return httpx.get(base + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- load generation
def one_request(client, base: str, prompt: list[int], max_tokens: int) -> dict:
    """Stream one completion; token arrival times relative to the send."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, n_tokens = [], 0
    with client.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                n_tokens = obj["usage"].get("completion_tokens", n_tokens)
            for ch in obj.get("choices") or []:
                if ch.get("text") or ch.get("token_ids"):
                    times.append(time.perf_counter() - t0)
    return {"times": times, "tokens": n_tokens or len(times)}


def phase(base: str, concurrency: int, requests: int, prompts: list[list[int]], max_tokens: int) -> dict:
    import httpx

    results, errors = [], []
    lock = threading.Lock()

    def client_thread(i: int) -> None:
        with httpx.Client() as c:
            for j in range(requests):
                try:
                    r = one_request(c, base, prompts[(i * requests + j) % len(prompts)], max_tokens)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(repr(e)[:200])
                    continue
                with lock:
                    results.append(r)

    ts = [threading.Thread(target=client_thread, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["times"][0] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    toks = sum(r["tokens"] for r in results)

    def pct(xs, q):
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))

    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors), "error_sample": errors[:2],
            "tokens": toks, "wall_s": wall, "tok_s": toks / wall if wall > 0 else 0.0,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def generate_decode_tps(packed: Path, threads: int, prompt: list[int], max_tokens: int) -> float:
    cmd = [sys.executable, "-m", "spectra", "generate", str(packed), "--prompt-ids", ",".join(map(str, prompt)),
           "--max-new-tokens", str(max_tokens), "--ignore-eos", "--threads", str(threads), "--json", "--no-verify"]
    best = 0.0
    for _ in range(3):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"spectra generate failed: {r.stderr.strip()[-300:]}")
        best = max(best, json.loads(r.stdout.strip().splitlines()[-1])["decode_tok_s"])
    return best


def bench_server(name: str, base: str, conc: list[int], requests: int, prompts, max_tokens: int) -> list[dict]:
    phase(base, 1, 1, prompts, min(max_tokens, 8))  # warm-up: page the weights in
    out = []
    for c in conc:
        r = phase(base, c, requests, prompts, max_tokens)
        r["server"] = name
        print(f"  {name:12} c={c:<3} {r['tok_s']:8.1f} tok/s  TTFT p50/p99 {r['ttft_p50'] * 1e3:7.1f}/"
              f"{r['ttft_p99'] * 1e3:7.1f} ms  ITL p50/p99 {r['itl_p50'] * 1e3:6.1f}/{r['itl_p99'] * 1e3:6.1f} ms"
              f"  ({r['requests']} req, {r['errors']} errors)", flush=True)
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="99m,390m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client thread at each concurrency")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request")
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "spectra-bench-infer"),
                    help="where model files are cached (shared with bench_infer.py)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-server (no build)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    import numpy as np

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    conc = [int(c) for c in args.concurrency.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t_start = time.time()
    notes = []
    exe = None
    if not args.no_llama:
        try:
            exe = build_llama_server(jobs=max(1, args.threads))
        except Exception as e:  # noqa: BLE001 - the row says why the peer is missing
            notes.append(f"llama-server build failed: {type(e).__name__}: {str(e)[:200]}")
            print("note:", notes[-1], flush=True)
    ctx = args.prompt + args.max_tokens + 8
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    figures = []
    for shape in args.shapes.split(","):
        print(f"[{shape}] preparing model files in {work} ...", flush=True)
        files = prepare(work, shape, exe is not None)
        from spectra.config import get_preset

        vocab = get_preset(shape).model.vocab_size
        rng = np.random.default_rng(3)
        prompts = [[int(t) for t in rng.integers(1, min(vocab, 50000), args.prompt)] for _ in range(64)]
        gen_tps = generate_decode_tps(files["packed"], args.threads, prompts[0], args.max_tokens)
        print(f"  spectra generate: decode {gen_tps:.1f} tok/s", flush=True)
        ours = Server([sys.executable, "-m", "spectra", "serve", str(files["packed"]), "--port", "0",
                       "--parallel", str(args.parallel), "--threads", str(args.threads), "--max-len", str(ctx),
                       "--max-queue", "1024", "--log-level", "warning"], work / f"serve-{shape}.log", None, env)
        try:
            rs = bench_server("spectra", ours.base, conc, args.requests, prompts, args.max_tokens)
        finally:
            ours.close()
        peer = []
        if exe is not None:
            port = free_port()
            ls = Server([str(exe), "-m", str(files["gguf"]), "--host", "127.0.0.1", "--port", str(port), "-t",
                         str(args.threads), "-tb", str(args.threads), "-cb", "--parallel", str(args.parallel),
                         "-c", str(ctx * args.parallel)], work / f"llama-server-{shape}.log", port, env)
            try:
                peer = bench_server("llama-server", ls.base, conc, args.requests, prompts, args.max_tokens)
            finally:
                ls.close()
        by = {(r["server"], r["concurrency"]): r for r in rs + peer}
        single = by.get(("spectra", 1))
        top = by.get(("spectra", max(conc)))
        parts = [f"{shape}: generate decode {gen_tps:.1f} tok/s"]
        for r in rs + peer:
            parts.append(f"{r['server']} c{r['concurrency']} {r['tok_s']:.1f} tok/s TTFT {r['ttft_p50'] * 1e3:.0f}/"
                         f"{r['ttft_p99'] * 1e3:.0f} ms ITL {r['itl_p50'] * 1e3:.1f}/{r['itl_p99'] * 1e3:.1f} ms"
                         + (f" ({r['errors']} errors)" if r["errors"] else ""))
        if single and top:
            parts.append(f"c{max(conc)}/c1 {top['tok_s'] / single['tok_s']:.2f}x")
            if single["itl_p50"] > 0:
                parts.append(f"single-stream server decode (1/ITL p50) / generate {1 / single['itl_p50'] / gen_tps:.2f}x")
        lt = by.get(("llama-server", max(conc)))
        if top and lt and lt["tok_s"] > 0:
            parts.append(f"c{max(conc)} ours/llama-server {top['tok_s'] / lt['tok_s']:.2f}x")
        print("  " + "; ".join(parts[1:]), flush=True)
        figures.append("; ".join(parts))
    load1 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload before/after: {load0} -> {load1}; wall {time.time() - t_start:.0f}s")
    if not args.no_record:
        cmd = "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:])
        row = (f"| {datetime.datetime.now():%Y-%m-%d %H:%M} | serve | {machine()} | {load0} -> {load1} | `{cmd.strip()}` | "
               f"{args.threads} threads, parallel {args.parallel}, prompt {args.prompt}, {args.max_tokens} tokens/request, "
               f"{args.requests} requests per client; " + " // ".join(figures)
               + ("; " + "; ".join(notes) if notes else "") + " |\n")
        res = REPO / "benchmarks" / "RESULTS.md"
        with open(res, "a") as f:
            f.write(row)
        print(f"recorded in {res}")


if __name__ == "__main__":
    main()
