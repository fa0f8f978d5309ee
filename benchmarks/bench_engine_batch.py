"""Multi-sequence native engine: aggregate decode tokens/s with 1, 4, 16 sequences stepped together.

One pass over the weights feeds every row of a step, so the aggregate rate should grow with the
number of sequences until compute, not memory, bounds it. Random 99m-shape TriLM (the same
checkpoint maker as bench_infer.py), t2 / f16 head, one process, alternated repetitions, best of
--reps per concurrency (interference only ever slows a run down). Prints a table; writes nothing.

    python benchmarks/bench_engine_batch.py [--preset 99m] [--threads 2] [--seqs 1,4,16] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="99m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqs", default="1,4,16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence before decoding")
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--act", default="int8x2")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "spectra-bench-engine-batch"))
    args = ap.parse_args(argv)

    from bench_infer import make_checkpoint

    from spectra.infer.engine import NativeBatchEngine
    from spectra.infer.packed_model import is_packed_dir, write_packed

    work = Path(args.work)
    ck = make_checkpoint(work / f"{args.preset}-ckpt", args.preset)
    packed = work / f"{args.preset}-t2-f16"
    if not is_packed_dir(packed):
        write_packed(ck, packed, "t2", "f16", progress=False)
    seqs = [int(s) for s in args.seqs.split(",")]
    eng = NativeBatchEngine.from_dir(packed, max_seqs=max(seqs), max_len=args.prompt + args.steps + 8,
                                     n_threads=args.threads, max_step_tokens=max(args.prompt * max(seqs), 64),
                                     kernel=args.kernel, act=args.act)
    rng = np.random.default_rng(0)
    V = eng.vocab_size
    best = {n: float("inf") for n in seqs}
    cpu = {n: float("inf") for n in seqs}  # process CPU time: with 1 thread, a load-robust proxy
    for rep in range(args.reps):
        for n in seqs if rep % 2 == 0 else seqs[::-1]:
            slots = [eng.acquire() for _ in range(n)]
            eng.step([(s, rng.integers(0, V, args.prompt)) for s in slots])
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                eng.step([(s, [int(rng.integers(0, V))]) for s in slots])
            best[n] = min(best[n], time.perf_counter() - t)
            cpu[n] = min(cpu[n], time.process_time() - c)
            for s in slots:
                eng.release(s)
    print(f"# {eng.describe()}; load average {os.getloadavg()[0]:.2f}")
    print("| sequences | ms / step | aggregate tok/s | vs 1 sequence | CPU ms / step | CPU-time ratio |")
    print("|---|---|---|---|---|---|")
    base = args.steps / best[seqs[0]] * seqs[0]
    for n in seqs:
        agg = args.steps * n / best[n]
        cratio = (cpu[seqs[0]] / seqs[0]) / (cpu[n] / n)
        print(f"| {n} | {1000 * best[n] / args.steps:.2f} | {agg:.1f} | {agg / base:.2f}x | "
              f"{1000 * cpu[n] / args.steps:.2f} | {cratio:.2f}x |")
    eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
