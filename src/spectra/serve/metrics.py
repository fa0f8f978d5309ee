"""Prometheus text-format metrics without a client library: counters, gauges, histograms (thread-safe)."""

from __future__ import annotations

import bisect
import threading

# Latency buckets (seconds): from a fast decode step to a long queued prefill.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)


def _fmt(v: float) -> str:
    return repr(float(v)) if v != int(v) else str(int(v))


class Counter:
    def __init__(self, name: str, help_: str, label: str | None = None):
        self.name, self.help, self.label = name, help_, label
        self._v: dict[str, float] = {}
        self._lock = threading.Lock()

    def inc(self, n: float = 1, label: str = "") -> None:
        with self._lock:
            self._v[label] = self._v.get(label, 0) + n

    def value(self, label: str = "") -> float:
        return self._v.get(label, 0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._v.items()) or [("", 0)]
        for lab, v in items:
            sel = f'{{{self.label}="{lab}"}}' if self.label and lab else ""
            out.append(f"{self.name}{sel} {_fmt(v)}")
        return out


class Gauge:
    def __init__(self, name: str, help_: str):
        self.name, self.help, self.v = name, help_, 0.0

    def set(self, v: float) -> None:
        self.v = float(v)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_fmt(self.v)}"]


class Histogram:
    def __init__(self, name: str, help_: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum, self.count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, v)] += 1
            self.sum += v
            self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            acc = 0
            for b, c in zip(self.buckets, self.counts):
                acc += c
                out.append(f'{self.name}_bucket{{le="{_fmt(b)}"}} {acc}')
            out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
            out.append(f"{self.name}_sum {self.sum!r}")
            out.append(f"{self.name}_count {self.count}")
        return out


class Metrics:
    def __init__(self):
        self.requests = Counter("spectra_requests_total", "Finished requests by finish reason.", "reason")
        self.http_errors = Counter("spectra_http_errors_total", "Requests refused with a 4xx/5xx status.", "status")
        self.prompt_tokens = Counter("spectra_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = Counter("spectra_generation_tokens_total", "Generated tokens.")
        self.queue_len = Gauge("spectra_queue_length", "Requests waiting for a sequence slot.")
        self.active = Gauge("spectra_active_sequences", "Sequences holding a slot.")
        self.ttft = Histogram("spectra_time_to_first_token_seconds", "Arrival to first generated token.")
        self.itl = Histogram("spectra_inter_token_latency_seconds", "Time between consecutive tokens of a request.")

    def render(self) -> str:
        parts = [self.requests, self.http_errors, self.prompt_tokens, self.generation_tokens, self.queue_len,
                 self.active, self.ttft, self.itl]
        return "\n".join(line for p in parts for line in p.render()) + "\n"


__all__ = ["Counter", "Gauge", "Histogram", "Metrics"]
