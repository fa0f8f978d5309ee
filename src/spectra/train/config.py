"""Training configuration: a tree of plain dataclasses, loaded from TOML/YAML/JSON
plus dotted ``section.key=value`` overrides.

Every ``None`` means "derive it": the learning rates and batch size come from the
preset and family (SPEC.md table), the warmup from the number of steps, the vocabulary
from the data directory's tokenizer. :func:`resolve` fills them in; the resolved tree
is what the run directory keeps (``train_config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectra.errors import SpectraError, closest
from spectra.store.dtypes import DTYPE_NAMES

FAMILIES = ("floatlm", "trilm", "bilm")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class ModelSection:
    preset: str | None = "nano"  # a name from spectra.config.PRESETS
    family: str = "trilm"  # floatlm | trilm | bilm (binary ablation)
    # Shape overrides of the preset (None = the preset's value).
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    ffn_dim: int | None = None
    mp: int | None = None  # TriLM model-parallel degree that defines the per-shard scales
    max_seq_len: int | None = None
    init_std: float | None = None
    vocab_size: int | None = None  # None: padded size of the data tokenizer (small presets) / preset's
    init_from: str | None = None  # spectra checkpoint or HF Llama directory to start from


@dataclass
class DataSection:
    dir: str | None = None  # a directory built by `spectra data`
    seq_len: int | None = None  # None: min(preset max_seq_len, 2048)
    seed: int = 0  # data order (shuffle) seed; same seed -> same order for every model
    val_split: str = "validation"
    allow_change: bool = False  # resume even if the data directory's fingerprint changed


@dataclass
class BatchSection:
    global_tokens: int | None = None  # None: preset's batch for the family
    micro_batch: int = 16  # sequences per forward/backward per rank (accumulation reaches the global batch)


@dataclass
class OptimSection:
    lr: float | None = None  # peak LR; None: preset (FloatLM lr, TriLM lr before the drop)
    lr_after: float | None = None  # TriLM peak LR after the drop; None: preset
    min_lr_ratio: float = 0.1  # end of decay as a fraction of the (current) peak
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # weight decay on embedding / head too
    decay_norms: bool = False  # weight decay on RMSNorm scales too
    clip: float = 1.0  # max global grad norm (0 = off)


@dataclass
class ScheduleSection:
    steps: int | None = None  # optimizer steps; or give tokens
    tokens: int | None = None
    warmup: float = 0.01  # < 1: fraction of steps; >= 1: steps
    decay: str = "auto"  # auto (cosine for FloatLM, linear for TriLM/BiLM) | cosine | linear | constant
    lr_drop: bool | None = None  # TriLM intervention 1 (None: on for trilm/bilm, off for floatlm)
    lr_drop_at: float = 0.5  # fraction of training
    wd_off: bool | None = None  # TriLM intervention 2
    wd_off_at: float = 2 / 3


@dataclass
class TrainSection:
    seed: int = 0  # model init seed
    precision: str = "auto"  # auto: fp32 on CPU, bf16 on GPU | fp32 | bf16 | fp16 (dynamic loss scaling)
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "auto"  # auto (ddp when world > 1) | none | ddp | fsdp
    max_bad_steps: int = 20  # stop after this many consecutive non-finite steps
    threads: int | None = None  # torch CPU threads (None: leave torch's default)
    compile: bool = False  # torch.compile each block (one graph reused by all layers); pays off on long runs
    activation_checkpoint: int = 0  # recompute every Nth block's activations in backward (1 = all, 0 = off)
    fused_loss: bool = True  # head + cross-entropy in row blocks, logits never materialized (spectra.losses)
    keep_freed_memory: bool = True  # CPU: glibc keeps large freed blocks for reuse (no per-step page faults)
    loss_scale_init: float = 2.0**16
    loss_scale_window: int = 1000  # overflow-free steps before doubling the fp16 loss scale
    loss_scale_min: float = 1.0


@dataclass
class CheckpointSection:
    log_spaced: bool = True  # permanent checkpoints at steps 1, 2, 4, ... (Pythia)
    log_spaced_until: int = 512
    every: int = 1000  # permanent checkpoints every N steps (0 = off)
    ephemeral_every: int = 0  # resume checkpoints every N steps, pruned to keep_last (0 = off)
    keep_last: int = 2
    final: bool = True
    dtype: str = "float32"  # model weights in the loadable dir: float32 | float16 | bfloat16


@dataclass
class EvalSection:
    every: int = 0  # validation every M steps (0 = only at the end)
    batches: int = 8  # validation batches of micro_batch windows
    at_end: bool = True


@dataclass
class LogSection:
    every: int = 1  # metrics.jsonl cadence (steps)
    tensorboard: bool | None = None  # None: when tensorboard is installed
    progress: bool = True
    peak_flops: float | None = None  # per device; None: GPU table / measured CPU matmul peak
    profile: str | None = None  # "A-B" (or "A"): torch.profiler trace of steps A..B -> RUN/profile/


@dataclass
class TrainConfig:
    out: str | None = None  # run directory
    resume: str = "none"  # none | auto | path of a checkpoint directory
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)

    # -- conversion ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        return _build(cls, d, source, "")

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_flat(self) -> dict[str, str]:
        """{dotted key: CLI string} for every field (e.g. to build a command line)."""
        out = {}
        for sec, v in self.to_dict().items():
            for k, x in (v.items() if isinstance(v, dict) else [(None, v)]):
                key = f"{sec}.{k}" if k else sec
                out[key] = "null" if x is None else (str(x).lower() if isinstance(x, bool) else repr(x) if isinstance(x, float) else str(x))
        return out

    def override(self, items: list[str] | dict, source: str = "override") -> "TrainConfig":
        """Apply ``section.key=value`` strings (or a {dotted: value} dict); returns a new config."""
        d = self.to_dict()
        pairs = items.items() if isinstance(items, dict) else [_split_kv(s) for s in items]
        for key, value in pairs:
            _set_dotted(d, key, value, source)
        return TrainConfig.from_dict(d, source)


def _split_kv(s: str) -> tuple[str, Any]:
    import yaml

    if "=" not in s:
        raise SpectraError(f"override '{s}' must look like section.key=value (e.g. optim.lr=1e-3)")
    k, v = s.split("=", 1)
    try:  # YAML scalars: 1e-3, true, null, [1, 2]
        val = yaml.safe_load(v) if v.strip() else None
    except yaml.YAMLError:
        val = v
    if isinstance(val, str) and _is_float(val):  # YAML 1.1 reads '1e-3' as a string
        val = float(val)
    return k.strip(), val


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _set_dotted(d: dict, key: str, value, source: str) -> None:
    parts = key.split(".")
    cur = d
    for i, p in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if p not in cur:
            raise SpectraError(f"{source}: unknown config key '{path}'{closest(p, cur.keys())}; "
                               f"allowed here: {', '.join(cur.keys())}")
        if i == len(parts) - 1:
            if isinstance(cur[p], dict):
                raise SpectraError(f"{source}: '{path}' is a section; set one of its keys ({', '.join(cur[p])})")
            cur[p] = value
        else:
            if not isinstance(cur[p], dict):
                raise SpectraError(f"{source}: '{path}' is a value, not a section")
            cur = cur[p]


def _build(cls, d: dict, source: str, prefix: str):
    if not isinstance(d, dict):
        raise SpectraError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a table/mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in d.items():
        if k not in fields:
            raise SpectraError(f"{source}: unknown config key '{prefix}{k}'{closest(str(k), fields)}; "
                               f"allowed: {', '.join(fields)}")
        f = fields[k]
        sub = _SECTIONS.get(f.name) if cls is TrainConfig else None
        if sub is not None:
            kw[k] = _build(sub, v, source, f"{prefix}{k}.")
        else:
            kw[k] = _coerce(v, f, f"{prefix}{k}", source)
    return cls(**kw)


def _coerce(v, f: dataclasses.Field, name: str, source: str):
    t = str(f.type)
    if v is None:
        if "None" in t:
            return None
        raise SpectraError(f"{source}: '{name}' may not be null")
    if t.startswith("bool"):
        if not isinstance(v, bool):
            raise SpectraError(f"{source}: '{name}' must be true or false, got {v!r}")
        return v
    if t.startswith("int"):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpectraError(f"{source}: '{name}' must be an integer, got {v!r}")
        return v
    if t.startswith("float"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpectraError(f"{source}: '{name}' must be a number, got {v!r}")
        if not math.isfinite(v):  # nan/inf would silently poison every step
            raise SpectraError(f"{source}: '{name}' must be a finite number, got {v!r}")
        return float(v)
    if t.startswith("str"):
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise SpectraError(f"{source}: '{name}' must be a string, got {v!r}")
        return str(v)
    return v


_SECTIONS = {"model": ModelSection, "data": DataSection, "batch": BatchSection, "optim": OptimSection,
             "schedule": ScheduleSection, "train": TrainSection, "checkpoint": CheckpointSection,
             "eval": EvalSection, "log": LogSection}


def load_config_file(path: str | Path) -> TrainConfig:
    """TOML (.toml), YAML (.yaml/.yml) or JSON (.json) file -> TrainConfig."""
    p = Path(path)
    if not p.is_file():
        raise SpectraError(f"config file '{p}' does not exist (or is not a file)")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpectraError(f"config file '{p}' is not UTF-8 text (byte {e.start})") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            d = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            d = json.loads(text)
        else:
            raise SpectraError(f"config file '{p}': unknown format '{p.suffix}' (use .toml, .yaml, .yml or .json)")
    except SpectraError:
        raise
    except Exception as e:  # noqa: BLE001 - parser errors name the line
        raise SpectraError(f"config file '{p}' cannot be parsed: {' '.join(str(e).split())[:300]}") from None
    return TrainConfig.from_dict(d, str(p))


def profile_range(spec) -> tuple[int, int]:
    """log.profile "A-B" or "A" -> (A, B), steps counted from 1."""
    try:
        parts = [int(x) for x in str(spec).split("-")]
        a, b = (parts[0], parts[-1]) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        a, b = 0, -1
    if not 1 <= a <= b:
        raise SpectraError(f"log.profile '{spec}' must be a step or a step range like 10-12 (steps count from 1)")
    return a, b


def validate(cfg: TrainConfig) -> None:
    """Checks that need no data or torch (names and ranges)."""
    m, s, o = cfg.model, cfg.schedule, cfg.optim
    if m.family not in FAMILIES:
        raise SpectraError(f"model.family '{m.family}' is unknown{closest(m.family, FAMILIES)}; allowed: {', '.join(FAMILIES)}")
    if m.preset is not None:
        from spectra.config import get_preset

        get_preset(m.preset)
    elif m.init_from is None:
        raise SpectraError("model.preset is required unless model.init_from names a checkpoint")
    if cfg.train.precision not in PRECISIONS:
        raise SpectraError(f"train.precision '{cfg.train.precision}' is unknown{closest(cfg.train.precision, PRECISIONS)}; allowed: {', '.join(PRECISIONS)}")
    if cfg.train.parallel not in STRATEGIES:
        raise SpectraError(f"train.parallel '{cfg.train.parallel}' is unknown{closest(cfg.train.parallel, STRATEGIES)}; allowed: {', '.join(STRATEGIES)}")
    if s.decay not in ("auto", "cosine", "linear", "constant"):
        raise SpectraError(f"schedule.decay '{s.decay}' is unknown{closest(s.decay, ['auto', 'cosine', 'linear', 'constant'])}")
    if s.steps is None and s.tokens is None:
        raise SpectraError("set schedule.steps or schedule.tokens (how long to train)")
    if s.steps is not None and s.steps <= 0 or s.tokens is not None and s.tokens <= 0:
        raise SpectraError("schedule.steps / schedule.tokens must be positive")
    for name in ("lr_drop_at", "wd_off_at"):
        if not 0 <= getattr(s, name) <= 1:
            raise SpectraError(f"schedule.{name} must be a fraction of training in [0, 1], got {getattr(s, name)}")
    if s.warmup < 0:
        raise SpectraError("schedule.warmup must be >= 0")
    if not 0 <= o.min_lr_ratio <= 1:
        raise SpectraError("optim.min_lr_ratio must be in [0, 1]")
    _check_ranges(cfg)
    if cfg.batch.micro_batch <= 0:
        raise SpectraError("batch.micro_batch must be positive")
    if cfg.checkpoint.dtype not in DTYPE_NAMES:
        raise SpectraError(f"checkpoint.dtype '{cfg.checkpoint.dtype}' must be {', '.join(DTYPE_NAMES[:-1])} or {DTYPE_NAMES[-1]}")
    if cfg.checkpoint.keep_last < 1:
        raise SpectraError("checkpoint.keep_last must be >= 1")
    if cfg.train.max_bad_steps < 1:
        raise SpectraError("train.max_bad_steps must be >= 1")
    if cfg.log.profile is not None:
        profile_range(cfg.log.profile)
    if isinstance(cfg.train.activation_checkpoint, bool) or cfg.train.activation_checkpoint < 0:
        raise SpectraError("train.activation_checkpoint must be an integer >= 0: 0 = off, 1 = every block, "
                           f"N = every Nth block (got {cfg.train.activation_checkpoint!r})")
    r = cfg.resume
    if r not in ("none", "auto") and not Path(r).exists():
        raise SpectraError(f"resume '{r}' is neither 'none', 'auto' nor an existing checkpoint directory")


# (dotted key, lower bound, lower bound excluded, upper bound (excluded)): numbers that have a meaningful range. None values mean
# "derive it" and are skipped; nan/inf are refused earlier, in _coerce.
_RANGES = [
    ("optim.lr", 0, True, None), ("optim.lr_after", 0, True, None), ("optim.beta1", 0, False, 1),
    ("optim.beta2", 0, False, 1), ("optim.eps", 0, True, None), ("optim.weight_decay", 0, False, None),
    ("optim.clip", 0, False, None), ("model.init_std", 0, True, None), ("batch.global_tokens", 0, True, None),
    ("data.seq_len", 0, True, None), ("eval.every", 0, False, None), ("eval.batches", 0, True, None),
    ("log.every", 0, True, None), ("log.peak_flops", 0, True, None), ("checkpoint.every", 0, False, None),
    ("checkpoint.ephemeral_every", 0, False, None), ("checkpoint.log_spaced_until", 0, False, None),
    ("train.loss_scale_init", 0, True, None), ("train.loss_scale_window", 0, True, None),
    ("train.loss_scale_min", 0, True, None),
]


def _check_ranges(cfg: TrainConfig) -> None:
    for key, lo, strict, hi in _RANGES:
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        if v is None:
            continue
        if v < lo or (strict and v == lo) or (hi is not None and v >= hi):
            rng = f"in [{lo}, {hi})" if hi is not None else (f"> {lo}" if strict else f">= {lo}")
            raise SpectraError(f"{key} must be {rng}, got {v}")
    if cfg.train.threads is not None:
        from spectra.validate import check_threads

        check_threads(cfg.train.threads, "train.threads")
