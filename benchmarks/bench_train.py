"""Training throughput on this CPU, measured side by side in one run.

* our FloatLM vs Hugging Face ``LlamaForCausalLM`` with the same config, batch, loss and
  optimizer (AdamW, matrices-only weight decay, clip 1.0) -- goal >= 1.2x tokens/s;
* our TriLM vs our FloatLM step time -- goal <= 1.10x.

Each side runs its own training path: ours calls the model with targets, as the trainer
does (head + cross-entropy fused, :mod:`spectra.losses`); HF computes logits and then the
cross-entropy, as ``LlamaForCausalLM(labels=...)`` does. Both use the same optimizer object
(``build_optimizer``: torch's fused AdamW, which is also the HF Trainer default with
torch >= 2.8). A profiled HF step gives the share of its time spent in GEMMs, which both
models run identically: ``HF step / HF GEMM time`` is the ceiling on ours/HF for any
implementation of the same fp32 math on this CPU.

Shapes: the ``micro`` preset and the ``99m`` shape with a short sequence. The three
variants are stepped round-robin (ABCABC...) so that load from other processes hits
them alike; we report the median step time. Appends a row to benchmarks/RESULTS.md.

    python benchmarks/bench_train.py [--steps 6] [--threads 2] [--compile]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spectra.config import get_preset
from spectra.losses import head_cross_entropy
from spectra.model import Transformer
from spectra.ternary import to_ternary
from spectra.train.config import TrainConfig
from spectra.train.optim import build_optimizer
from spectra.train.cpu import keep_freed_memory
from spectra.train.parallel import apply_compile

from _common import cpu_summary  # noqa: E402  (benchmarks/ is on sys.path)

RESULTS = Path(__file__).with_name("RESULTS.md")


def hf_model(mc):
    import transformers

    from spectra.checkpoint import hf_config

    d = hf_config(mc, "floatlm")
    d.pop("spectra")
    c = transformers.LlamaConfig(**d)
    c._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(c)


def make_step(model, loss_fn, opt):
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x, y):
        loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def bench_shape(name, mc, batch, seq, steps, compile_ours, bf16=False):
    torch.manual_seed(0)
    cfg = TrainConfig()
    x = torch.randint(0, mc.vocab_size, (batch, seq))
    y = torch.randint(0, mc.vocab_size, (batch, seq))
    ours_f = Transformer(mc).init_weights(0).train()
    ours_t = to_ternary(Transformer(mc).init_weights(0)).train()
    hf = hf_model(mc).train()
    hf.load_state_dict({("model." + k if not k.startswith("lm_head") else k): v
                        for k, v in ours_f.state_dict().items()}, strict=False)
    def hf_loss(x, y):  # what LlamaForCausalLM(labels=...) computes: full logits, then CE
        return F.cross_entropy(hf(x).logits.float().flatten(0, 1), y.flatten())

    fns = {}
    for key, m in (("ours_float", ours_f), ("ours_trilm", ours_t), ("hf_float", hf)):
        if key.startswith("ours"):
            if compile_ours:
                apply_compile(m)  # what train.compile=true does
            loss_fn = (lambda m: lambda x, y: m(x, targets=y, loss_fn=head_cross_entropy))(m)  # the trainer's loss path
        else:
            loss_fn = hf_loss
        fns[key] = make_step(m, loss_fn, build_optimizer(m, cfg, 1e-4))
    if bf16:  # informational: train.precision=bf16 (autocast) on this CPU; never the default
        ours_b = Transformer(mc).init_weights(0).train()
        step_b = make_step(ours_b, lambda x, y: ours_b(x, targets=y, loss_fn=head_cross_entropy), build_optimizer(ours_b, cfg, 1e-4))

        def bf16_step(x, y):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return step_b(x, y)

        fns["ours_float_bf16"] = bf16_step
    times = {k: [] for k in fns}
    for i in range(steps + 1):  # step 0 = warm-up (allocations, compile)
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(x, y)
            if i:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = batch * seq
    # GEMM share of an HF step (profiled separately: the profiler's overhead stays out of
    # the timings above). GEMMs are the same FLOPs in both models.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fns["hf_float"](x, y)
        prof_step = time.perf_counter() - t0
    gemm = sum(e.self_cpu_time_total for e in prof.key_averages()
               if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")) / 1e6
    gemm_share = gemm / prof_step
    return {"shape": name, "batch": f"{batch}x{seq}",
            **{f"{k}_tok_s": tok / v for k, v in med.items()},
            "ours_vs_hf": med["hf_float"] / med["ours_float"],
            "trilm_vs_float": med["ours_trilm"] / med["ours_float"],
            "hf_gemm_share": gemm_share, "ceiling": 1.0 / gemm_share,
            "bf16_vs_fp32": med["ours_float"] / med["ours_float_bf16"] if bf16 else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile our blocks as train.compile=true does (not HF)")
    ap.add_argument("--shapes", default="micro,99m")
    ap.add_argument("--bf16", action="store_true", help="also time our FloatLM under bf16 autocast (informational)")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    # What the trainer does on CPU; process-wide, so HF benefits from it equally here.
    tuned = keep_freed_memory()
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    for s in a.shapes.split(","):
        if s == "micro":
            rows.append(bench_shape("micro", get_preset("micro").model, 16, 256, a.steps, a.compile, a.bf16))
        elif s == "99m":
            rows.append(bench_shape("99m (seq 128)", get_preset("99m").model, 4, 128, max(3, a.steps // 2), a.compile, a.bf16))
    load1 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    hdr = ["shape", "batch", "ours_float tok/s", "hf_float tok/s", "ours_trilm tok/s", "ours/HF speed", "TriLM/Float time",
           "HF GEMM share", "ours/HF ceiling"]
    print(" | ".join(hdr))
    for r in rows:
        print(f"{r['shape']} | {r['batch']} | {r['ours_float_tok_s']:.0f} | {r['hf_float_tok_s']:.0f} | "
              f"{r['ours_trilm_tok_s']:.0f} | {r['ours_vs_hf']:.2f}x | {r['trilm_vs_float']:.2f}x | "
              f"{100 * r['hf_gemm_share']:.0f}% | {r['ceiling']:.2f}x"
              + (f" | bf16 autocast {r['ours_float_bf16_tok_s']:.0f} tok/s ({r['bf16_vs_fp32']:.2f}x fp32)" if a.bf16 else ""))
    if a.no_record:
        return
    cmd = "python benchmarks/bench_train.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(a).items()
        if k != "no_record" and v not in (False, None))
    figs = "; ".join(
        f"{r['shape']} batch {r['batch']}: ours FloatLM {r['ours_float_tok_s']:.0f} tok/s, HF LlamaForCausalLM "
        f"{r['hf_float_tok_s']:.0f} tok/s (**ours/HF {r['ours_vs_hf']:.2f}x**), ours TriLM {r['ours_trilm_tok_s']:.0f} tok/s "
        f"(**TriLM/Float step time {r['trilm_vs_float']:.2f}x**); GEMMs are {100 * r['hf_gemm_share']:.0f}% of an HF step, "
        f"so ours/HF cannot exceed {r['ceiling']:.2f}x in fp32"
        + (f"; ours FloatLM under bf16 autocast {r['ours_float_bf16_tok_s']:.0f} tok/s ({r['bf16_vs_fp32']:.2f}x its fp32)"
           if a.bf16 else "") for r in rows)
    figs = (f"fp32, fused AdamW (both) + clip, ours with the fused head+CE loss, "
            f"{'glibc keeps freed memory (both), ' if tuned else ''}median of round-robin steps"
            f"{', our blocks torch.compiled' if a.compile else ''}; " + figs)
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\n| date | area | machine | load (1/5/15 min) | command | figures |\n"
                           "|---|---|---|---|---|---|\n")
    row = (f"| {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} | train | {cpu_summary()}, torch "
           f"{torch.__version__} threads {a.threads} | {load0} -> {load1} | `{cmd}` | {figs} |\n")
    text = RESULTS.read_text()
    with open(RESULTS, "a") as f:
        if not text.endswith("\n"):
            f.write("\n")
        f.write(row)

if __name__ == "__main__":
    main()
