"""`spectra suite`: train, quantize, pack, evaluate and report a whole Spectra family.

One token dataset is shared by every run, and every run reads it in the same order
(same data seed), as in the paper. For each size: a FloatLM and a TriLM with the same
checkpoint schedule, QuantLMs (GPTQ 8/6/4/3) from the final FloatLM, a packed TriLM,
evaluation of every final model, then the report.

The suite directory::

    SUITE/suite.json          the plan (refuses to mix with a different plan)
    SUITE/stages.json         finished stages with their results (re-runs skip them)
    SUITE/data/               the token dataset (spectra data)
    SUITE/runs/<family>-<size>/   training runs (spectra train; resumable)
    SUITE/quant/<size>/       QuantLMs (spectra quantize)
    SUITE/packed/<size>/      packed TriLMs (spectra pack)
    SUITE/eval/<model>.json   evaluation results (spectra eval)
    SUITE/models.json         the index the report reads
    SUITE/report/             report.md, PNG plots, results.csv/json

Re-running the same command skips finished stages and resumes an interrupted
training run from its newest complete checkpoint; every stage writes atomically and
is deterministic, so an interrupted suite finishes with the same results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from spectra.errors import SpectraError, closest
from spectra.fsutil import atomic_write_json


@dataclass
class SuitePlan:
    preset: str
    sizes: list[str]
    tokens: int  # training tokens per model (same for every size, as in the paper)
    seq_len: int
    batch_tokens: int  # global batch in tokens (both families, so checkpoints align)
    data: str = "default"  # corpus source for `spectra data build`, or an existing data dir
    tokenizer: str | None = None  # None: train a byte-level BPE on the corpus
    vocab_size: int = 2048  # BPE vocab when training one
    families: list[str] = field(default_factory=lambda: ["floatlm", "trilm"])
    quant_bits: list[int] = field(default_factory=lambda: [8, 6, 4, 3])
    quant_seeds: list[int] = field(default_factory=lambda: [0])
    quant_method: str = "gptq"
    calib_samples: int = 32
    calib_seqlen: int = 256
    group_size: int = 128
    pack_format: str = "t2"
    eval_tasks: str | None = "spectra6"  # lm-eval tasks when task data is available
    eval_limit: int | None = 200  # examples per task (None: all)
    task_data: str | None = None  # local task data dir (None: $SPECTRA_TASK_DATA, user cache, Hub)
    val_windows: int = 64  # validation windows for the final validation loss
    checkpoint_every: int = 0  # permanent checkpoints every N steps besides the log-spaced ones
    log_spaced_until: int = 64
    eval_every: int = 0  # validation loss every N steps during training (0: derived)
    warmup: float = 0.01  # LR warmup: fraction of steps (< 1) or steps (>= 1)
    seed: int = 0
    threads: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        d = self.to_dict()
        for k in ("threads", "task_data"):  # do not change results
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


SUITE_PRESETS = {
    # ~15 minutes on a 2-core CPU, embedded demo corpus.
    # Small batches (8 x 128 tokens) give these tiny models ~600 optimizer steps, which
    # matters more than context length at this scale (measured: val loss 4.4-4.6 vs 5.1-5.4
    # with 146 steps of 16 x 256 on the same 600k tokens).
    "tiny": dict(sizes=["tiny1", "tiny2", "tiny3"], tokens=600_000, seq_len=128, batch_tokens=8 * 128,
                 vocab_size=2048, calib_samples=64, calib_seqlen=128, eval_limit=100, log_spaced_until=32,
                 checkpoint_every=100, warmup=0.05),
    # An hour or more on a CPU (or minutes on a GPU): larger models, more tokens.
    "small": dict(sizes=["nano", "tiny3", "micro"], tokens=8_000_000, seq_len=256, batch_tokens=32 * 256,
                  vocab_size=8192, calib_samples=128, calib_seqlen=256, eval_limit=500),
    # The real configuration: nine sizes, 300B tokens, NeoX tokenizer; for GPU clusters via torchrun.
    "spectra": dict(sizes=["99m", "190m", "390m", "560m", "830m", "1.1b", "1.5b", "2.4b", "3.9b"],
                    tokens=300_000_000_000, seq_len=2048, batch_tokens=1024 * 1024, data="hf:cerebras/SlimPajama-627B",
                    tokenizer="gpt-neox-20b", vocab_size=50277, quant_seeds=[0, 1, 2], calib_samples=512,
                    calib_seqlen=2048, eval_limit=None, eval_tasks="spectra13", checkpoint_every=2000,
                    log_spaced_until=512, eval_every=1000),
}


def make_plan(preset: str, sizes: list[str] | None = None, **overrides) -> SuitePlan:
    if preset not in SUITE_PRESETS:
        raise SpectraError(f"unknown suite preset '{preset}'{closest(preset, SUITE_PRESETS)}; "
                           f"allowed: {', '.join(SUITE_PRESETS)}")
    base = dict(SUITE_PRESETS[preset])
    if sizes:
        bad = [s for s in sizes if s not in base["sizes"]]
        if bad:
            raise SpectraError(f"size '{bad[0]}' is not in suite preset '{preset}'; allowed: {', '.join(base['sizes'])}")
        base["sizes"] = [s for s in base["sizes"] if s in sizes]
    base.update({k: v for k, v in overrides.items() if v is not None})
    plan = SuitePlan(preset=preset, **base)
    if plan.tokens < plan.batch_tokens:
        raise SpectraError(f"tokens={plan.tokens} is less than one global batch ({plan.batch_tokens} tokens)")
    if plan.batch_tokens % plan.seq_len:
        raise SpectraError(f"batch tokens {plan.batch_tokens} must be a multiple of seq_len {plan.seq_len}")
    return plan


def steps_of(plan: SuitePlan) -> int:
    return plan.tokens // plan.batch_tokens


# ----------------------------------------------------------------------------- estimates

def train_flops_per_token(size: str, seq_len: int) -> float:
    """Training FLOPs per token of a preset (the one formula: :func:`spectra.train.metrics.flops_per_token`)."""
    from spectra.config import get_preset
    from spectra.train.metrics import flops_per_token

    return flops_per_token(get_preset(size).model, seq_len)


def measured_cpu_flops(threads: int | None = None) -> float:
    """fp32 matmul FLOP/s of this machine, measured briefly (for plan estimates)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(3):
        a @ b
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < 0.3:
        a @ b
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t)


def describe_plan(plan: SuitePlan, flops: float | None = None, efficiency: float = 0.35) -> str:
    """Human-readable plan with an estimated training time on this machine.

    The estimate is FLOPs / (measured matmul FLOP/s x efficiency): small models on a
    CPU reach roughly a third of the matmul peak in training (measured on the tiny
    preset); TriLM adds ~10% for the ternary forward.
    """
    from spectra.config import get_preset
    from spectra.model import build_meta, param_counts

    steps = steps_of(plan)
    lines = [f"suite '{plan.preset}': {len(plan.sizes)} sizes x {len(plan.families)} families, "
             f"{plan.tokens:,} tokens per model ({steps:,} steps of {plan.batch_tokens:,} tokens, seq {plan.seq_len})",
             f"data: {plan.data}  tokenizer: {plan.tokenizer or f'byte-level BPE ({plan.vocab_size})'}  (one dataset, "
             "one data order for every run)",
             f"QuantLM: {plan.quant_method} {'/'.join(map(str, plan.quant_bits))}-bit, group {plan.group_size}, seeds "
             f"{plan.quant_seeds}, calibration {plan.calib_samples} x {plan.calib_seqlen}; packed TriLM: {plan.pack_format}",
             f"eval: validation loss ({plan.val_windows} windows)"
             + (f" + lm-eval {plan.eval_tasks} (limit {plan.eval_limit})" if plan.eval_tasks else ""),
             *describe_tasks(plan), ""]
    head = f"{'size':8s} {'params':>9s} {'non-emb':>9s} {'FLOPs/token':>12s} {'est. FloatLM':>13s} {'est. TriLM':>11s}"
    lines += [head, "-" * len(head)]
    total = 0.0
    for s in plan.sizes:
        cfg = get_preset(s).model
        c = param_counts(build_meta(cfg))
        f = train_flops_per_token(s, plan.seq_len)
        t_float = f * plan.tokens / (flops * efficiency) if flops else float("nan")
        t_tri = 1.1 * t_float
        total += t_float + t_tri
        lines.append(f"{s:8s} {c['total'] / 1e6:8.2f}M {c['non_embedding'] / 1e6:8.2f}M {f:12.3g} "
                     f"{_dur(t_float):>13s} {_dur(t_tri):>11s}")
    total_flops = sum(train_flops_per_token(s, plan.seq_len) * plan.tokens * 2.1 for s in plan.sizes)
    if total_flops > 1e18:  # GPU-scale plan: also say what a cluster would need
        h100 = 989e12 * 0.4  # bf16 dense peak x 40% MFU
        lines += ["", f"total training compute {total_flops:.3g} FLOPs: about {_dur(total_flops / (64 * h100))} on "
                  "64 x H100 at 40% MFU (bf16)"]
    if flops:
        lines += ["", f"estimated training time on this machine: {_dur(total)} "
                  f"(measured fp32 matmul {flops / 1e9:.0f} GFLOP/s x {efficiency:.0%} efficiency; "
                  "quantization, packing and evaluation add a few minutes for small presets)"]
    return "\n".join(lines)


def plan_tasks(plan: SuitePlan) -> tuple[list[str], dict[str, str], str]:
    """(lm-eval tasks that will run, {task: why skipped}, where the task data comes from)."""
    from spectra.eval.tasks import expand_tasks, resolve_task_data, task_status

    if not plan.eval_tasks:
        return [], {}, "no lm-eval tasks in the plan (--no-tasks)"
    names = expand_tasks(plan.eval_tasks)
    td = resolve_task_data(plan.task_data, names)
    run, skipped = task_status(names, td)
    return run, skipped, (f"{td.source}: {td.path}" if td.path else td.source)


def describe_tasks(plan: SuitePlan) -> list[str]:
    """Plan lines saying which lm-eval tasks will run and which are skipped, and why."""
    run, skipped, src = plan_tasks(plan)
    if not plan.eval_tasks:
        return [f"lm-eval tasks: none ({src})"]
    lines = [f"lm-eval tasks ({src}): " + (f"will run {', '.join(run)}" if run else "NONE will run")]
    why: dict[str, list[str]] = {}
    for t, r in skipped.items():
        why.setdefault(r, []).append(t)
    lines += [f"  skipped {', '.join(ts)}: {r}" for r, ts in why.items()]
    return lines


def neox_tokenizer(log=print) -> str | None:
    """The GPT-NeoX-20B tokenizer.json: $SPECTRA_TOKENIZER, the user cache
    ($SPECTRA_HOME/tokenizers/gpt-neox-20b.json), the Hugging Face cache / Hub
    (EleutherAI/gpt-neox-20b); None (train a BPE on the corpus) when none is available."""
    import os

    from spectra.eval.tasks import spectra_home

    env = os.environ.get("SPECTRA_TOKENIZER", "").strip()
    if env:
        if not Path(env).is_file():
            raise SpectraError(f"SPECTRA_TOKENIZER='{env}' is not a file; point it at a tokenizer.json or unset it")
        return env
    cached = spectra_home() / "tokenizers" / "gpt-neox-20b.json"
    if cached.is_file():
        return str(cached)
    try:
        from huggingface_hub import hf_hub_download

        from spectra.store.hub import hub_cache_dir, offline

        return hf_hub_download("EleutherAI/gpt-neox-20b", "tokenizer.json", cache_dir=hub_cache_dir(),
                               local_files_only=offline())
    except Exception as e:  # noqa: BLE001  (no network, no cache, no huggingface_hub: all mean "not available")
        log(f"GPT-NeoX-20B tokenizer not available ({type(e).__name__}); training a byte-level BPE on the corpus "
            f"instead (set SPECTRA_TOKENIZER or put it at {cached})")
        return None


def _dur(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.1f}min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.0f}d"


def unigram_loss(data_dir) -> float:
    """Validation cross-entropy (nats/token) of the train split's unigram distribution (add-one).

    The baseline a language model must beat by far to have learned anything beyond
    token frequencies.
    """
    import numpy as np

    from spectra.data import TokenDataset

    tr, va = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "validation")
    v = max(int(tr.padded_vocab_size), int(tr.vocab_size))
    counts = np.bincount(np.asarray(tr.read(0, tr.num_tokens), dtype=np.int64), minlength=v).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    val = np.asarray(va.read(0, va.num_tokens), dtype=np.int64)
    return float(-logp[val].mean())


# ----------------------------------------------------------------------------- stages

class Suite:
    """Runs the stages of a plan in a suite directory, skipping finished ones."""

    def __init__(self, plan: SuitePlan, out: str | Path, progress: bool = True):
        self.plan, self.out, self.progress = plan, Path(out), progress
        self.stages_file = self.out / "stages.json"
        self._hub_down: str | None = None  # why lm-eval's Hub datasets failed (asked once per invocation)

    # -- bookkeeping ------------------------------------------------------------------
    def check_dir(self) -> None:
        f = self.out / "suite.json"
        if f.exists():
            old = json.loads(f.read_text())
            if old.get("key") != self.plan.key():
                diff = [k for k, v in self.plan.to_dict().items() if old.get("plan", {}).get(k) != v
                        and k not in ("threads", "task_data")]
                raise SpectraError(f"'{self.out}' holds a different suite (preset '{old.get('plan', {}).get('preset')}'; "
                                   f"differs in: {', '.join(diff) or 'version'}); use a new --out or the same options")
        elif self.out.exists() and any(self.out.iterdir()):
            raise SpectraError(f"'{self.out}' is not empty and holds no suite.json; choose an empty or new --out")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(f, {"key": self.plan.key(), "plan": self.plan.to_dict()})

    def done(self) -> dict:
        return json.loads(self.stages_file.read_text()) if self.stages_file.exists() else {}

    def _mark(self, name: str, result: dict, seconds: float) -> None:
        d = self.done()
        d[name] = {"result": result, "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.stages_file, d)

    def stage(self, name: str, fn, *args):
        d = self.done()
        if name in d:
            self.log(f"[skip] {name} (done)")
            return d[name]["result"]
        self.log(f"[run ] {name}")
        t = time.perf_counter()
        result = fn(*args)
        self._mark(name, result, time.perf_counter() - t)
        self.log(f"[done] {name} in {time.perf_counter() - t:.1f}s")
        return result

    def log(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)

    # -- the pipeline -----------------------------------------------------------------
    def run(self) -> Path:
        import torch

        if self.plan.threads:
            torch.set_num_threads(self.plan.threads)
        self.check_dir()
        for line in describe_tasks(self.plan):
            self.log(line)
        t0 = time.perf_counter()
        self.stage("data", self.build_data)
        for size in self.plan.sizes:
            for fam in self.plan.families:
                self.stage(f"train/{fam}-{size}", self.train_one, fam, size)
        for size in self.plan.sizes:
            if "floatlm" in self.plan.families and self.plan.quant_bits:
                self.stage(f"quantize/{size}", self.quantize_one, size)
            if "trilm" in self.plan.families and self.plan.pack_format:
                self.stage(f"pack/{size}", self.pack_one, size)
        for model_id, path, fam, size in self.final_models():
            self.stage(f"eval/{model_id}", self.eval_one, model_id, path, fam, size)
        for size in self.plan.sizes:
            if f"pack/{size}" in self.done():
                self.stage(f"eval/trilm-{size}-packed", self.eval_packed, size)
        for size in self.plan.sizes:
            for fam in self.plan.families:
                self.stage(f"checkpoints/{fam}-{size}", self.eval_checkpoints, fam, size)
        report = self.write_report()
        self.log(f"suite finished in {time.perf_counter() - t0:.0f}s (this invocation); report: {report}")
        return report

    @property
    def data_dir(self) -> Path:
        src = Path(self.plan.data)
        if src.is_dir() and (src / "manifest.json").exists():
            return src  # an existing token dataset
        return self.out / "data"

    def build_data(self) -> dict:
        from spectra.data import TokenDataset, build_dataset

        if self.data_dir != self.out / "data":
            ds = TokenDataset(self.data_dir, "train")
        else:
            tok = self.plan.tokenizer
            if tok == "gpt-neox-20b":
                tok = neox_tokenizer(self.log)
            build_dataset(self.plan.data, self.out / "data", tokenizer=tok, vocab_size=self.plan.vocab_size,
                          seed=self.plan.seed)
            ds = TokenDataset(self.out / "data", "train")
        need = self.plan.tokens
        if ds.num_tokens < need:
            raise SpectraError(
                f"data '{self.plan.data}' yields {ds.num_tokens:,} training tokens but the plan needs {need:,} "
                f"({steps_of(self.plan)} steps x {self.plan.batch_tokens:,} tokens, one epoch as in the paper); "
                "use a larger corpus or lower --tokens")
        return {"dir": str(self.data_dir), "train_tokens": int(ds.num_tokens), "fingerprint": ds.fingerprint,
                "vocab_size": int(ds.vocab_size), "unigram_loss": unigram_loss(self.data_dir)}

    def run_dir(self, fam: str, size: str) -> Path:
        return self.out / "runs" / f"{fam}-{size}"

    def train_config(self, fam: str, size: str):
        from spectra.train import TrainConfig

        p = self.plan
        steps = steps_of(p)
        eval_every = p.eval_every or max(1, steps // 8)
        cfg = TrainConfig().override({
            "model.preset": size, "model.family": fam,
            "data.dir": str(self.data_dir), "data.seq_len": p.seq_len, "data.seed": p.seed,
            "batch.global_tokens": p.batch_tokens, "batch.micro_batch": min(16, p.batch_tokens // p.seq_len),
            "schedule.steps": steps, "schedule.warmup": p.warmup, "train.seed": p.seed,
            "checkpoint.log_spaced": True, "checkpoint.log_spaced_until": p.log_spaced_until,
            "checkpoint.every": p.checkpoint_every, "checkpoint.ephemeral_every": max(1, steps // 4),
            "eval.every": eval_every, "log.progress": self.progress,
        }, source="suite plan")
        return cfg.replace(out=str(self.run_dir(fam, size)), resume="auto")

    def train_one(self, fam: str, size: str) -> dict:
        from spectra.train import final_checkpoint, train

        run = train(self.train_config(fam, size))
        return {"run": str(run), "final": str(final_checkpoint(run))}

    def final_checkpoint(self, fam: str, size: str) -> Path:
        return Path(self.done()[f"train/{fam}-{size}"]["result"]["final"])

    def quantize_one(self, size: str) -> dict:
        import torch

        from spectra.quant import calibration_tokens, quantize_model, save_quantized
        from spectra.quant.api import spec_of
        from spectra.store import find_tokenizer, load_model, quantlm_name

        p = self.plan
        src = self.final_checkpoint("floatlm", size)
        model, _ = load_model(src)
        tok = find_tokenizer(src)
        out = {}
        for seed in p.quant_seeds:
            calib = calibration_tokens(self.data_dir, p.calib_samples, p.calib_seqlen, seed)
            for bits in p.quant_bits:
                name = quantlm_name(bits, p.group_size, p.quant_method, seed)
                if name in out:  # RTN takes no calibration seed: one QuantLM per bit width
                    continue
                torch.manual_seed(seed)
                qm, qstate, report = quantize_model(model, calib, bits, p.group_size, p.quant_method)
                paths = save_quantized(qm, qstate, self.out / "quant" / size / name, spec_of(report),
                                       meta={"seed": seed, "source": str(src), "size": size},
                                       tokenizer=tok, report=report)
                out[name] = {k: str(v) for k, v in paths.items()}
        return out

    def pack_one(self, size: str) -> dict:
        from spectra.infer import write_packed

        src = self.final_checkpoint("trilm", size)
        dst = self.out / "packed" / size
        write_packed(src, dst, fmt=self.plan.pack_format)
        return {"packed": str(dst)}

    def final_models(self) -> list[tuple[str, Path, str, str]]:
        """(id, path, family, size) for every final model: FloatLM, QuantLMs (every seed), TriLM."""
        from spectra.store import parse_quantlm_name

        d = self.done()
        rows = []
        for size in self.plan.sizes:
            for fam in self.plan.families:
                key = f"train/{fam}-{size}"
                if key in d:
                    rows.append((f"{fam}-{size}", Path(d[key]["result"]["final"]), fam, size))
            q = d.get(f"quantize/{size}", {}).get("result", {})
            for name, paths in q.items():
                qn = parse_quantlm_name(name)
                rows.append((f"{qn.family}-{size}-{qn.variant}", Path(paths["unpacked"]), qn.family, size))
        return rows

    def task_data(self) -> Path | None:
        from spectra.eval.tasks import expand_tasks, resolve_task_data

        if not self.plan.eval_tasks:
            return None
        return resolve_task_data(self.plan.task_data, expand_tasks(self.plan.eval_tasks)).path

    def eval_one(self, model_id: str, path: Path, fam: str, size: str) -> dict:
        from spectra.eval import evaluate

        p = self.plan
        run, skipped, src = plan_tasks(p)
        task_data = self.task_data()
        out = self.out / "eval" / f"{model_id}.json"
        kw = dict(limit=p.eval_limit, out=out, val_data=str(self.data_dir), val_seq_len=p.seq_len,
                  val_windows=p.val_windows, progress=self.progress)
        if self._hub_down and task_data is None:  # failed for an earlier model: do not wait on the network again
            skipped.update({t: self._hub_down for t in run})
            run = []
        for t, why in skipped.items():
            self.log(f"[skip] lm-eval task {t} for {model_id}: {why}")
        try:
            res = evaluate(str(path), tasks=",".join(run) or None, task_data=task_data, **kw)
        except SpectraError as e:
            if task_data is not None or not run:
                raise
            # Hub datasets unreachable: keep the validation loss, say why the tasks are missing.
            self._hub_down = f"Hub datasets unavailable: {e}"
            self.log(f"[skip] lm-eval tasks {', '.join(run)} for {model_id}: {e}")
            skipped.update({t: self._hub_down for t in run})
            res = evaluate(str(path), tasks=None, **kw)
        if skipped:  # the results file says it too, not only the suite's log
            from spectra.eval import write_results

            res["skipped"] = {**skipped, **(res.get("skipped") or {})}
            write_results(res, out)
        return {"results": str(out), "val_loss": res.get("val_loss"), "six_task_avg": res.get("six_task_avg"),
                "tasks_source": src, "tasks_skipped": skipped}

    def eval_packed(self, size: str) -> dict:
        """Validation loss of the packed TriLM through the native engine (same windows)."""
        from spectra.eval import evaluate
        from spectra.store import TOKENIZER_FILE

        path = Path(self.done()[f"pack/{size}"]["result"]["packed"])
        out = self.out / "eval" / f"trilm-{size}-packed.json"
        res = evaluate(str(path), tasks=None, out=out, val_data=str(self.data_dir), val_seq_len=self.plan.seq_len,
                       val_windows=self.plan.val_windows, progress=self.progress)
        nbytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name != TOKENIZER_FILE)
        return {"results": str(out), "val_loss": res.get("val_loss"), "bytes": nbytes}

    def eval_checkpoints(self, fam: str, size: str) -> dict:
        """Validation loss of every permanent intermediate checkpoint (same windows as the finals)."""
        from spectra.eval import validation_loss
        from spectra.store import checkpoints, load_model, read_config

        rows = []
        for step, path in checkpoints(self.run_dir(fam, size)):
            meta = read_config(path).get("spectra", {})
            model, _ = load_model(path)
            vl = validation_loss(model, str(self.data_dir), self.plan.seq_len, self.plan.val_windows)
            rows.append({"step": step, "tokens": meta.get("tokens"), "val_loss": vl, "val_ppl": math.exp(vl)})
        return {"checkpoints": rows}

    # -- report -----------------------------------------------------------------------
    def records(self):
        from spectra.report.collect import ModelRecord, eval_into, model_sizes, record_from_run

        d = self.done()
        recs = []
        for model_id, path, fam, size in self.final_models():
            if fam in ("floatlm", "trilm", "bilm"):
                rec = record_from_run(self.run_dir(fam, size), family=fam, size=size)
                rec.id = model_id
                rec.checkpoints = d.get(f"checkpoints/{fam}-{size}", {}).get("result", {}).get("checkpoints", [])
            else:
                rec = ModelRecord(id=model_id, family=fam, size=size)
                rec.params, rec.non_embedding, rec.size_bits = model_sizes(path, fam)
            ev = d.get(f"eval/{model_id}", {}).get("result")
            if ev:
                eval_into(rec, json.loads(Path(ev["results"]).read_text()))
                if ev.get("tasks_skipped"):
                    rec.extra["tasks_skipped"] = ev["tasks_skipped"]
            packed = d.get(f"eval/{model_id}-packed", {}).get("result")
            if packed:
                rec.extra["packed"] = {"val_loss": packed["val_loss"], "bytes": packed["bytes"],
                                       "format": self.plan.pack_format}
            recs.append(rec)
        # QuantLMs with several calibration seeds are averaged by the report (average_seeds).
        return recs

    def write_report(self) -> Path:
        from spectra.report import write_report
        from spectra.store import write_suite_index

        recs = self.records()
        write_suite_index(self.out, self.plan.to_dict(), [r.to_dict() for r in recs])
        p = self.plan
        uni = (self.done().get("data", {}).get("result", {}) or {}).get("unigram_loss") or unigram_loss(self.data_dir)
        pre = (f"Suite `{p.preset}`: sizes {', '.join(p.sizes)}; {p.tokens:,} tokens per model from `{p.data}`; "
               f"same data order for every run (seed {p.seed}). QuantLMs: {p.quant_method} "
               f"{'/'.join(map(str, p.quant_bits))}-bit, group {p.group_size}. Validation loss: mean token NLL on "
               f"{p.val_windows} windows of {p.seq_len} tokens of the validation split"
               + (f"; a unigram model (train-split token frequencies) scores {uni:.3f} nats/token there" if uni else "")
               + ".\n")
        return write_report([], self.out / "report", paper=True, records=recs, preamble=pre,
                            title=f"Spectra suite report ({p.preset})")
