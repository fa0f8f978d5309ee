"""Shared helpers for the benchmark scripts (run as `python benchmarks/bench_*.py`)."""

from __future__ import annotations

import os
import platform

ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")


def cpu_summary(isa_flags=ISA_FLAGS) -> str:
    """'<model name> x<cores> (<ISA flags present>)' from /proc/cpuinfo, for RESULTS.md rows."""
    model, flags = platform.processor() or "?", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [f for f in isa_flags if f in flags]
    return f"{model} x{os.cpu_count()} ({' '.join(isa) or 'no avx2'})"
