"""Step metrics: JSONL (+ TensorBoard when installed), FLOPs per token and MFU.

FLOPs per trained token (PaLM appendix B; Chinchilla counts the same way):
``6 N + 12 L d T`` where N is the non-embedding parameter count (block matrices,
norms and the output head: the input embedding is a lookup, not a matmul), L layers,
d the model width and T the sequence length. The attention term is the score
(QK^T) and value (AV) matmuls, 2 x 2 L d T FLOPs forward, x3 with the backward pass,
counted over the *full* T x T matrix even though causal masking makes half of it
zero: that is the convention MFU figures in the literature use, so ours compare with
theirs. :func:`flops_per_token` is the only FLOPs formula in the package (the suite's
time estimates call it too). MFU = achieved FLOP/s / peak FLOP/s of the devices in use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from spectra.store.kinds import METRICS_FILE  # the run-directory layout lives in spectra.store

# Dense peak FLOP/s per device for the precision the trainer runs in (vendor sheets, no sparsity).
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12},
}


def memory_stats(device_type: str) -> dict:
    """Peak memory for the step record: GPU bytes allocated since the last call (then reset), or
    the process's peak RSS on CPU (Linux reports it in KiB), both in GiB."""
    if device_type == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return {"mem_gib": peak}
    try:
        import resource
    except ImportError:  # not on Linux/macOS
        return {}
    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token, ``6 N + 12 L d T`` (see the module docstring)."""
    d, L, f, v = model_cfg.dim, model_cfg.n_layers, model_cfg.ffn_dim, model_cfg.vocab_size
    n_non_embedding = L * (4 * d * d + 3 * d * f + 2 * d) + d + d * v  # blocks + final norm + head
    return 6.0 * n_non_embedding + 12.0 * L * d * seq_len


_CPU_PEAK: dict[str, float] = {}


def measured_cpu_peak(precision: str = "fp32", seconds: float = 0.25) -> float:
    """Matmul FLOP/s of this process's torch threads in ``precision`` (cached): the CPU 'peak' for MFU.

    Measured in the precision the run computes in: bf16 matmuls are ~1.7x faster than fp32
    on CPUs with AVX512-BF16, so an fp32 peak would put bf16 runs above 100% MFU.
    """
    if precision not in _CPU_PEAK:
        import torch

        from spectra.train.precision import amp_dtype

        dtype = amp_dtype(precision)
        a, b = torch.randn(512, 512).to(dtype), torch.randn(512, 512).to(dtype)
        for _ in range(3):
            a @ b
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        _CPU_PEAK[precision] = 2 * 512**3 * n / (time.perf_counter() - t0)
    return _CPU_PEAK[precision]


def device_peak_flops(device_type: str, precision: str, configured: float | None = None) -> float | None:
    if configured:
        return float(configured)
    if device_type == "cpu":
        return measured_cpu_peak(precision)
    import torch

    name = torch.cuda.get_device_name()
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return GPU_PEAK_FLOPS[key].get(precision) or None
    return None


class MetricsLogger:
    """Append-only JSONL (one object per record) and optional TensorBoard scalars. Rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool | None = None):
        self.enabled = enabled
        self.f = None
        self.tb = None
        if not enabled:
            return
        self.f = open(run_dir / METRICS_FILE, "a", buffering=1)  # line-buffered
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                if tensorboard:
                    from spectra.errors import SpectraError

                    raise SpectraError("log.tensorboard=true but TensorBoard is not installed: "
                                       "pip install 'spectra-lm[tensorboard]' (or set log.tensorboard=false)") from None
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}" if k != "val_loss" else "val/loss", v, step)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def truncate_after(path: Path, step: int) -> None:
    """Drop records with step > ``step`` (a resume replays those steps)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    from spectra.fsutil import atomic_write_text

    atomic_write_text(path, "".join(s + "\n" for s in keep))


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / METRICS_FILE
    out = []
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
