"""GPU checks of the training engine, for a session that has a GPU (one short script).

Run:  python benchmarks/gpu_train_check.py [--out DIR] [--steps 30]

1. bf16 autocast: a micro TriLM and FloatLM train on CUDA; loss falls; tokens/s and MFU
   (against the peak-FLOPs table) are reported.
2. fp16 with dynamic loss scaling: runs, reports the final loss scale and overflow skips;
   an artificially huge initial scale must produce counted, skipped overflow steps.
3. fp32 on GPU vs fp32 on CPU: the first losses agree to 1e-3 (TF32 off).
4. A saved GPU checkpoint loads on CPU with transformers and gives our logits (<= 1e-4).
5. Throughput: tokens/s and MFU of the trainer (fused loss, fused AdamW) for the 99m and
   390m shapes, FloatLM and TriLM, bf16 and fp16 (loss scaling), seq 2048.
Everything needed is local (the embedded demo corpus); writes results.json to --out.
``--smoke`` runs section 5 only, on the CPU with the micro shape, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_train_check_out"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tp-steps", type=int, default=20, help="steps per throughput run (the second half is averaged)")
    ap.add_argument("--tp-shapes", default="99m,390m")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU self-check of the throughput section (micro, 2 steps)")
    a = ap.parse_args()
    import torch

    if a.smoke:
        a.tp_shapes, a.tp_steps = "micro", 2
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from spectra.data import build_dataset
    from spectra.train import TrainConfig, read_metrics, train

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_dataset("default", out / "data", vocab_size=4096, progress=False)
    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
                 "torch": torch.__version__}

    def run(name, **kw):
        base = {"out": str(out / name), "data.dir": str(data), "model.preset": "micro", "data.seq_len": 256,
                "batch.global_tokens": 32 * 256, "batch.micro_batch": 16, "schedule.steps": a.steps,
                "log.progress": False, "checkpoint.log_spaced": False, "checkpoint.every": 0, "eval.batches": 4}
        base.update(kw)
        t0 = time.time()
        r = train(TrainConfig().override(base))
        m = [x for x in read_metrics(r) if "loss" in x]
        v = [x["val_loss"] for x in read_metrics(r) if "val_loss" in x]
        tail = m[len(m) // 2:]
        info = {"first_loss": m[0]["loss"], "last_loss": m[-1]["loss"], "val_loss": v[-1] if v else None,
                "tok_per_s": sum(x["tok_per_s"] for x in tail) / len(tail),
                "mfu": (sum(x["mfu"] for x in tail) / len(tail)) if tail[0]["mfu"] else None,
                "loss_scale": m[-1]["loss_scale"], "skipped": sum(1 for x in m if x.get("skipped")),
                "wall_s": time.time() - t0}
        res[name] = info
        print(name, json.dumps(info), flush=True)
        return r, m

    def throughput() -> bool:
        """Section 5: the trainer's own tokens/s and MFU (its metrics), per shape/family/precision."""
        good = True
        micro = {"99m": 16, "390m": 8, "micro": 4}
        for shape in a.tp_shapes.split(","):
            mb = micro.get(shape, 4)
            seq = 2048 if shape != "micro" else 256
            for fam in ("floatlm", "trilm"):
                for prec in (("bf16", "fp16") if not a.smoke else ("bf16",)):
                    _, m = run(f"tp-{shape}-{fam}-{prec}", **{
                        "model.preset": shape, "model.family": fam, "train.precision": prec,
                        "train.device": "cpu" if a.smoke else "cuda", "data.seq_len": seq,
                        "batch.global_tokens": mb * seq, "batch.micro_batch": mb, "schedule.steps": a.tp_steps,
                        "checkpoint.final": False, "eval.batches": 1, "eval.at_end": False,
                        **({"model.vocab_size": 50304} if shape not in ("micro", "nano") else {})})
                    good &= all(math.isfinite(x["loss"]) for x in m)
        return good

    if a.smoke:
        ok = throughput()
        (out / "results.json").write_text(json.dumps(res, indent=2))
        return 0 if ok else 1

    ok = True
    for fam in ("trilm", "floatlm"):
        _, m = run(f"bf16-{fam}", **{"model.family": fam, "train.precision": "bf16", "train.device": "cuda"})
        ok &= m[-1]["loss"] < m[0]["loss"] - 1.0
    r16, m16 = run("fp16-trilm", **{"model.family": "trilm", "train.precision": "fp16", "train.device": "cuda"})
    ok &= m16[-1]["loss"] < m16[0]["loss"] - 1.0
    _, mo = run("fp16-overflow", **{"model.family": "floatlm", "train.precision": "fp16", "train.device": "cuda",
                                    "train.loss_scale_init": 2.0**40, "schedule.steps": 12})
    ok &= sum(1 for x in mo if x.get("skipped")) >= 1  # huge initial scale -> skipped, counted overflows
    _, g32 = run("fp32-gpu", **{"model.family": "trilm", "train.precision": "fp32", "train.device": "cuda", "schedule.steps": 3})
    _, c32 = run("fp32-cpu", **{"model.family": "trilm", "train.precision": "fp32", "train.device": "cpu", "schedule.steps": 3})
    diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(g32, c32))
    res["fp32_gpu_vs_cpu_max_loss_diff"] = diff
    ok &= diff <= 1e-3
    try:
        import transformers

        from spectra.checkpoint import load_model

        ours, _ = load_model(r16 / "final")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(r16 / "final"), dtype=torch.float32).eval()
        x = torch.randint(0, 4096, (2, 64))
        with torch.no_grad():
            d = (ours(x) - hf(x).logits).abs().max().item()
        res["hf_logit_diff"] = d
        ok &= d <= 1e-4
    except ImportError:
        res["hf_logit_diff"] = None
    if not a.skip_throughput:
        ok &= throughput()
    res["ok"] = bool(ok)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
