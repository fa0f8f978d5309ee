"""QuantLM benchmark: GPTQ cost on a Spectra shape, and GPTQ vs RTN perplexity on a trained model.

Part 1 (cost): quantize the ``--shape`` preset (random init weights; the cost does not
depend on the values) at ``--bits`` with ``--nsamples x --seqlen`` random calibration
tokens, in a fresh child process, and report wall time, time per block and the child's
peak RSS. ``--layers N`` truncates the depth (memory of one block's activations is the
same; time scales with depth) when the machine is too busy for the full run.

Part 2 (quality): validation perplexity of a trained FloatLM and of its GPTQ / RTN
QuantLMs. ``--trained CKPT --data DIR``; without them a small FloatLM is trained on the
shared tinyshakespeare text first (``--train-preset``, ``--train-steps``).

    python benchmarks/bench_quant.py                       # 99m, 4-bit, 128 x 2048
    python benchmarks/bench_quant.py --nsamples 16 --seqlen 512 --layers 2   # quick
Appends a row to benchmarks/RESULTS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from _common import cpu_summary  # noqa: E402  (benchmarks/ is on sys.path)


def machine() -> str:
    import torch

    return f"{cpu_summary(('avx2', 'fma', 'f16c', 'avx512f', 'avx512_bf16'))}, torch {torch.__version__} threads {torch.get_num_threads()}"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- part 1: cost, in a child process so the peak RSS is this run's alone -----------------

def worker(a) -> None:
    import resource

    import torch

    from spectra.config import get_preset
    from spectra.model import Transformer
    from spectra.quant import quantize_model

    torch.set_num_threads(a.threads)
    cfg = get_preset(a.shape).model
    if a.layers:
        cfg = cfg.replace(n_layers=a.layers)
    model = Transformer(cfg).init_weights(0).eval()
    calib = torch.randint(0, cfg.vocab_size, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    _, _, report = quantize_model(model, calib, a.bits, a.group_size, method=a.method, inplace=True,
                                  progress=True)
    secs = time.perf_counter() - t0
    gptq_s = sum(r["seconds"] for r in report["linears"])
    print(json.dumps({"seconds": secs, "gptq_seconds": gptq_s, "layers": cfg.n_layers,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "rss_before_gib": rss0}))


def cost(a) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--shape", a.shape, "--bits", str(a.bits), "--group-size",
           str(a.group_size), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--threads", str(a.threads),
           "--method", a.method] + (["--layers", str(a.layers)] if a.layers else [])
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- part 2: quality ------------------------------------------------------------------

def quality(a) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from spectra.checkpoint import load_model
    from spectra.data import TokenDataset, build_dataset
    from spectra.quant import calibration_tokens, quantize_model

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    if a.trained:
        ckpt, data = Path(a.trained), Path(a.data)
    else:
        text = REPO / ".." / "shared" / "data" / "text" / "tinyshakespeare.txt"
        data = Path(a.data) if a.data else build_dataset(text, work / "data", vocab_size=1024, val_fraction=0.1,
                                                         progress=False)
        from spectra.train.checkpointing import final_checkpoint
        from spectra.train.config import TrainConfig
        from spectra.train.trainer import train

        cfg = TrainConfig().override({
            "model.preset": a.train_preset, "model.family": "floatlm", "schedule.steps": a.train_steps,
            "data.dir": str(data), "data.seq_len": a.q_seqlen, "batch.global_tokens": 16 * a.q_seqlen,
            "batch.micro_batch": 16, "optim.lr": 3e-3, "out": str(work / f"run-{a.train_preset}-{a.train_steps}"),
            "log.progress": False, "checkpoint.log_spaced": False, "checkpoint.every": 0, "eval.at_end": False,
            "log.tensorboard": False, "resume": "auto"})
        ckpt = final_checkpoint(train(cfg))
    model, _ = load_model(ckpt)
    val = TokenDataset(data, "validation")

    @torch.no_grad()
    def ppl(m):
        tot = n = 0
        for x, y in val.eval_windows(a.q_seqlen, max_windows=a.val_windows, batch_size=16):
            tot += m.loss(x, y).item() * y.numel()
            n += y.numel()
        return math.exp(tot / n)

    calib = calibration_tokens(data, a.q_nsamples, a.q_seqlen, seed=0)
    res = {"model": str(ckpt), "float": ppl(model)}
    for bits in a.q_bits:
        for method in ("gptq", "rtn"):
            mq, _, _ = quantize_model(model, calib if method == "gptq" else None, bits, a.group_size, method=method)
            res[f"{method}{bits}"] = ppl(mq)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="99m")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--method", default="gptq")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--layers", type=int, default=0, help="truncate the shape to N blocks (0 = all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--trained", help="trained FloatLM checkpoint for the quality part")
    p.add_argument("--data", help="token data dir for the quality part (calibration: train, perplexity: validation)")
    p.add_argument("--train-preset", default="nano")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--q-bits", type=lambda s: [int(x) for x in s.split(",")], default=[3, 4, 8])
    p.add_argument("--q-nsamples", type=int, default=64)
    p.add_argument("--q-seqlen", type=int, default=128)
    p.add_argument("--val-windows", type=int, default=256)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "spectra-bench-quant"))
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0
    load0 = load()
    figures = []
    if not a.skip_cost:
        c = cost(a)
        depth = f" (first {c['layers']} blocks)" if a.layers else ""
        print(f"\n{a.method} {a.bits}-bit g{a.group_size}, {a.shape}{depth}, calibration {a.nsamples}x{a.seqlen}")
        print(f"  wall {c['seconds']:.1f} s ({c['seconds'] / c['layers']:.1f} s/block; GPTQ solves "
              f"{c['gptq_seconds']:.1f} s, the rest is forward passes + Hessians)")
        print(f"  peak RSS {c['peak_rss_gib']:.2f} GiB (model + calibration before quantizing: {c['rss_before_gib']:.2f} GiB)")
        figures.append(f"{a.method} {a.bits}-bit g{a.group_size} on {a.shape}{depth} random-init weights, calibration "
                       f"{a.nsamples}x{a.seqlen}: wall {c['seconds']:.1f} s ({c['seconds'] / c['layers']:.1f} s/block, "
                       f"GPTQ solves {c['gptq_seconds']:.1f} s), peak RSS {c['peak_rss_gib']:.2f} GiB")
    if not a.skip_quality:
        q = quality(a)
        keys = ["float"] + [f"{m}{b}" for b in a.q_bits for m in ("gptq", "rtn")]
        print(f"\nvalidation perplexity ({q['model']}):")
        for k in keys:
            print(f"  {k:>7}: {q[k]:.3f}  ({q[k] / q['float']:.4f}x float)")
        figures.append(f"val ppl of trained {a.train_preset if not a.trained else 'model'} "
                       f"(group {a.group_size}, calib {a.q_nsamples}x{a.q_seqlen}): "
                       + ", ".join(f"{k} {q[k]:.3f}" for k in keys))
    if not a.no_record and figures:
        row = (f"| {datetime.now():%Y-%m-%d %H:%M} | quant | {machine()} | {load0} -> {load()} | "
               f"`python benchmarks/bench_quant.py {' '.join(sys.argv[1:])}` | {'; '.join(figures)} |\n")
        res = REPO / "benchmarks" / "RESULTS.md"
        if not res.exists():
            res.write_text("# Benchmark results\n\n| date | area | machine | load (1/5/15 min) | command | figures |\n"
                           "|---|---|---|---|---|---|\n")
        with open(res, "a") as f:
            f.write(row)
        print(f"\nrecorded in {res}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
