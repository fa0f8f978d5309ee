"""Training engine: FloatLM / TriLM / BiLM pretraining on CPU, GPU or torchrun (DDP / FSDP2).

Public API::

    from spectra.train import TrainConfig, train, list_checkpoints, final_checkpoint
    cfg = TrainConfig().override(["model.preset=nano", "data.dir=DATA", "schedule.steps=200"])
    run = train(cfg.replace(out="runs/nano-trilm"))

See docs/training.md.
"""

from .checkpointing import final_checkpoint, latest_checkpoint, list_checkpoints
from .config import TrainConfig, load_config_file
from .metrics import read_metrics
from .schedule import Schedule, build_schedule
from .trainer import train

__all__ = ["TrainConfig", "load_config_file", "train", "list_checkpoints", "final_checkpoint",
           "latest_checkpoint", "read_metrics", "Schedule", "build_schedule"]
