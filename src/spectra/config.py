"""Model shapes: the nine Spectra presets, small CPU presets, and validation.

A :class:`ModelConfig` is the architecture only (what ``model.py`` needs). A
:class:`Preset` adds the published training hyper-parameters of that size (peak
learning rates of both families, global batch in tokens). Everything is a plain
frozen dataclass; nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from spectra.errors import SpectraError, closest

NEOX_VOCAB = 50277  # GPT-NeoX-20B tokenizer vocabulary as used by Pythia / Spectra
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Megatron-style model parallelism: column-parallel layers split their output rows,
# row-parallel layers split their input columns. The TriLM scale is per split block.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def split_of(name: str) -> str:
    """Model-parallel split of a block linear ("col" or "row") from its module or parameter name (no torch: packed loaders use it)."""
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
    if leaf in COLUMN_PARALLEL:
        return "col"
    if leaf in ROW_PARALLEL:
        return "row"
    raise SpectraError(f"'{name}' is not a transformer-block linear layer ({', '.join(COLUMN_PARALLEL + ROW_PARALLEL)})")


def padded_vocab(vocab: int, mp: int = 1) -> int:
    """Embedding rows padded to a multiple of 128 x MP (GPT-NeoX rule: 50277 -> 50304)."""
    if vocab <= 0:
        raise SpectraError(f"vocab size must be positive, got {vocab}")
    m = 128 * mp
    return int(math.ceil(vocab / m) * m)


@dataclass(frozen=True)
class ModelConfig:
    """LLaMA-style decoder shape (both families share it)."""

    dim: int  # hidden size
    n_layers: int
    n_heads: int
    ffn_dim: int  # SwiGLU inner ("GLU") size
    vocab_size: int = 50304  # already padded
    mp: int = 1  # model-parallel degree the TriLM scales are defined for
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self, require_padded_vocab: bool = True) -> "ModelConfig":
        """Check the shape; raise SpectraError naming the field and the allowed values.

        ``require_padded_vocab=False`` accepts any vocabulary (foreign HF checkpoints).
        """
        for name in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "mp", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise SpectraError(f"model field '{name}' must be a positive integer, got {v!r}")
        from spectra.validate import check_model_limits  # hard limits before anything is sized from them

        check_model_limits(dataclasses.asdict(self), "model config")
        if self.dim % self.n_heads:
            raise SpectraError(
                f"model field 'dim'={self.dim} is not divisible by 'n_heads'={self.n_heads}; "
                f"allowed n_heads: {_divisors(self.dim)}"
            )
        if self.head_dim % 2:
            raise SpectraError(f"head dimension dim/n_heads={self.head_dim} must be even for RoPE")
        for name in ("dim", "ffn_dim", "n_heads"):
            v = getattr(self, name)
            if v % self.mp:
                raise SpectraError(
                    f"model field 'mp'={self.mp} does not divide '{name}'={v} (each model-parallel "
                    f"shard needs an equal block); allowed mp: {_divisors(math.gcd(self.dim, self.ffn_dim, self.n_heads))}"
                )
        # The embedding is split by rows across MP ranks (vocab-parallel), so MP must
        # divide it; new tokenizers are padded with padded_vocab() (128 x MP rule).
        if require_padded_vocab and (self.vocab_size % 128 or self.vocab_size % self.mp):
            raise SpectraError(
                f"model field 'vocab_size'={self.vocab_size} must be a multiple of 128 and of mp={self.mp}; "
                f"use {padded_vocab(self.vocab_size, self.mp)}"
            )
        for name in ("norm_eps", "rope_theta", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SpectraError(f"model field '{name}' must be a positive finite number, got {v!r}")
        return self

    def replace(self, **kw) -> "ModelConfig":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            k = sorted(unknown)[0]
            raise SpectraError(f"unknown model field '{k}'{closest(k, [f.name for f in dataclasses.fields(self)])}")
        return dataclasses.replace(self, **kw).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            k = sorted(unknown)[0]
            raise SpectraError(f"unknown model field '{k}'{closest(k, names)}")
        return cls(**d).validate()


@dataclass(frozen=True)
class Preset:
    """A named size with the training hyper-parameters published for it."""

    name: str
    model: ModelConfig
    float_lr: float
    trilm_lr: float  # peak LR before the halfway drop
    trilm_lr_after: float  # peak LR after the halfway drop
    float_batch_tokens: int = 2 * 1024 * 1024  # ~2M tokens (1024 x 2048)
    trilm_batch_tokens: int = 1024 * 1024  # ~1M tokens (512 x 2048)
    paper_params: float | None = None  # the size the paper prints (for checks/plots)
    spectra: bool = True  # one of the nine published sizes
    notes: str = field(default="", compare=False)


def _spectra(name, dim, ffn, heads, layers, mp, flr, tlr, tlr2, paper, vocab=None):
    # Released vocab: 50304 for MP <= 3 (checked on the released configs; for MP = 2 the
    # strict 128 x MP rule would give 50432, but the released 1.1B/1.5B have 50304),
    # 50688 (= 768 x 66) believed for the MP = 6 3.9B.
    vocab = vocab or padded_vocab(NEOX_VOCAB, mp)
    m = ModelConfig(dim=dim, n_layers=layers, n_heads=heads, ffn_dim=ffn, vocab_size=vocab, mp=mp)
    return Preset(name, m.validate(), flr, tlr, tlr2, paper_params=paper)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _spectra("99m", 512, 1280, 8, 16, 1, 4.0e-4, 2.4e-3, 1.5e-3, 99.74e6),
        _spectra("190m", 768, 2048, 12, 16, 1, 4.0e-4, 2.4e-3, 1.5e-3, 190.0e6),
        _spectra("390m", 1024, 2560, 16, 24, 1, 3.0e-4, 1.8e-3, 1.2e-3, 392.4e6),
        _spectra("560m", 1280, 3072, 20, 24, 1, 2.8e-4, 1.6e-3, 1.1e-3, 569.2e6),
        _spectra("830m", 1536, 4096, 24, 24, 1, 2.5e-4, 1.5e-3, 1.0e-3, 834.0e6),
        _spectra("1.1b", 1792, 5120, 28, 24, 2, 2.2e-4, 1.3e-3, 9.0e-4, 1.149e9, vocab=50304),
        _spectra("1.5b", 2048, 6144, 32, 24, 2, 2.0e-4, 1.2e-3, 8.0e-4, 1.515e9, vocab=50304),
        _spectra("2.4b", 2304, 7680, 36, 30, 3, 2.0e-4, 1.2e-3, 8.0e-4, 2.461e9),
        _spectra("3.9b", 3072, 9216, 24, 30, 6, 1.5e-4, 1.2e-3, 8.0e-4, 3.989e9),
        # Small presets for CPU work: same architecture, a small BPE vocabulary trained on
        # the corpus (the vocab is replaced by the data directory's tokenizer when training).
        # Widths are multiples of 256 where the packed/GGUF ternary formats need it.
        Preset(
            "nano",
            ModelConfig(dim=128, n_layers=4, n_heads=4, ffn_dim=384, vocab_size=4096, max_seq_len=256).validate(),
            float_lr=3e-3, trilm_lr=6e-3, trilm_lr_after=4e-3,
            float_batch_tokens=16 * 256, trilm_batch_tokens=16 * 256, spectra=False,
            notes="~1.9M params; tests and smoke runs",
        ),
        Preset(
            "micro",
            ModelConfig(dim=256, n_layers=8, n_heads=4, ffn_dim=768, vocab_size=8192, max_seq_len=512).validate(),
            float_lr=2e-3, trilm_lr=4e-3, trilm_lr_after=2.5e-3,
            float_batch_tokens=16 * 256, trilm_batch_tokens=16 * 256, spectra=False,
            notes="~11M params; CPU training, kernel and export tests",
        ),
        # The `spectra suite --preset tiny` family: one width (256, the packed/GGUF block
        # size) and growing depth/GLU so that three sizes train on 2 CPU cores in minutes.
        *[
            Preset(
                name,
                ModelConfig(dim=256, n_layers=layers, n_heads=4, ffn_dim=ffn, vocab_size=2048, max_seq_len=256).validate(),
                float_lr=lr, trilm_lr=2 * lr, trilm_lr_after=1.33 * lr,
                float_batch_tokens=16 * 256, trilm_batch_tokens=16 * 256, spectra=False,
                notes="suite `tiny` size",
            )
            for name, layers, ffn, lr in [("tiny1", 1, 512, 3e-3), ("tiny2", 2, 768, 2.5e-3), ("tiny3", 4, 768, 2e-3)]
        ],
    ]
}

SPECTRA_SIZES = [p.name for p in PRESETS.values() if p.spectra]


def get_preset(name: str) -> Preset:
    key = name.lower()
    if key not in PRESETS:
        raise SpectraError(
            f"unknown preset '{name}'{closest(key, PRESETS)}; allowed: {', '.join(PRESETS)}"
        )
    return PRESETS[key]


def _divisors(n: int) -> str:
    ds = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, ds[:12])) + (", ..." if len(ds) > 12 else "")
