"""Log-likelihood throughput: our `spectra` lm-eval model vs lm-eval's own `hf` model.

Same random Hugging Face Llama directory (GPT-NeoX tokenizer, vocab 50304), same
tasks from local data, same limit and batch size, both run in this one process one
after the other (order alternated over --repeats). Reports requests/s of each and the
ratio, and checks that every acc/acc_norm is identical. Appends a row to
benchmarks/RESULTS.md.

    python benchmarks/bench_eval.py                       # defaults below
    python benchmarks/bench_eval.py --limit 100 --hidden 512 --layers 8 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    return "avx512" if "avx512f" in flags else ("avx2" if "avx2" in flags else "no-avx2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="arc_easy,piqa,hellaswag,boolq,winogrande")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    import spectra.eval  # noqa: F401
    sys.path.insert(0, str(REPO / "tests"))  # test helpers: not part of the package
    from helpers.random_llama import make_random_llama
    from spectra.eval.tasks import write_local_tasks

    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model_dir = make_random_llama(tmp / "model", DATA / "tokenizer" / "gpt-neox-20b.json", hidden=args.hidden,
                                  layers=args.layers, heads=max(1, args.hidden // 64), ffn=args.hidden * 3,
                                  max_len=2048, std=0.05)
    write_local_tasks(tasks, DATA / "eval", tmp / "tasks")
    tm = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
    backends = {"spectra": {"pretrained": str(model_dir), "threads": args.threads},
                "hf": {"pretrained": str(model_dir), "device": "cpu", "dtype": "float32"}}
    secs = {k: [] for k in backends}
    results = {}
    order = list(backends)
    for rep in range(args.repeats):
        for name in (order if rep % 2 == 0 else order[::-1]):
            lm = lm_eval.api.registry.get_model(name).create_from_arg_obj(backends[name], {"batch_size": args.batch_size})
            # time only the scoring (model load and dataset preparation are outside)
            counter = {"n": 0, "t": 0.0}
            orig = lm.loglikelihood

            def timed(reqs, *a, _orig=orig, **k):
                t0 = time.perf_counter()
                out = _orig(reqs, *a, **k)
                counter["t"] += time.perf_counter() - t0
                counter["n"] += len(reqs)
                return out

            lm.loglikelihood = timed
            r = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=args.limit, bootstrap_iters=0)
            secs[name].append(counter["t"])
            results[name] = ({t: {k: v for k, v in r["results"][t].items() if k.startswith(("acc,", "acc_norm,"))}
                              for t in tasks}, counter["n"])
    n_req = results["spectra"][1]
    assert n_req == results["hf"][1]
    identical = results["spectra"][0] == results["hf"][0]
    best = {k: min(v) for k, v in secs.items()}
    rps = {k: n_req / best[k] for k in best}
    ratio = rps["spectra"] / rps["hf"]
    load = os.getloadavg()
    print(f"\nmodel: random Llama hidden={args.hidden} layers={args.layers} vocab=50304; tasks={args.tasks} "
          f"limit={args.limit} batch={args.batch_size} threads={args.threads}; {n_req} loglikelihood requests")
    print(f"{'backend':<10}{'seconds':>10}{'req/s':>10}")
    for k in backends:
        print(f"{k:<10}{best[k]:>10.2f}{rps[k]:>10.1f}")
    print(f"speedup spectra/hf: {ratio:.2f}x; accuracies identical: {identical}")
    for t in tasks:
        print(f"  {t}: spectra {results['spectra'][0][t]}  hf {results['hf'][0][t]}")
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if not args.no_record:
        res = REPO / "benchmarks" / "RESULTS.md"
        if not res.exists():
            res.write_text("# Benchmark results\n\n| date | area | machine | load (1/5/15 min) | command | figures |\n"
                           "|---|---|---|---|---|---|\n")
        cmd = ("python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])).strip()
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        figures = (f"random HF Llama hidden {args.hidden}, {args.layers} layers, vocab 50304, fp32; {args.tasks}, "
                   f"limit {args.limit}, batch {args.batch_size}; {n_req} loglikelihood requests, best of {args.repeats}: "
                   f"spectra {best['spectra']:.2f} s = {rps['spectra']:.1f} req/s; lm-eval hf {best['hf']:.2f} s = "
                   f"{rps['hf']:.1f} req/s; **{ratio:.2f}x**; acc/acc_norm identical on every task: {identical}")
        row = (f"| {now} | eval | {cpu_model()} x{os.cpu_count()} ({cpu_flags()}), torch threads {args.threads} | "
               f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} | `{cmd}` | {figures} |\n")
        text = res.read_text()
        with open(res, "a") as f:
            f.write(("" if text.endswith("\n") else "\n") + row)
        print(f"appended to {res}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
