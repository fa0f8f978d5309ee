"""spectra train: pretrain / continue a FloatLM, TriLM or BiLM (single process or torchrun)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a FloatLM / TriLM / BiLM (CPU, GPU, or torchrun for DDP / FSDP2)",
        description="Train a model. Settings come from the defaults, then --config FILE (TOML/YAML/JSON), "
                    "then the flags below, then dotted overrides such as optim.lr=1e-3 schedule.steps=500. "
                    "Multi-process: torchrun --nproc-per-node N -m spectra train ... "
                    "See docs/training.md.",
    )
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="dotted config overrides")
    p.add_argument("--config", help="config file (.toml, .yaml, .yml, .json)")
    p.add_argument("--preset", help="model size (nano, micro, 99m, ... 3.9b)")
    p.add_argument("--family", choices=["floatlm", "trilm", "bilm"])
    p.add_argument("--data", help="data directory built by `spectra data`")
    p.add_argument("--out", help="run directory")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--tokens", type=float, help="training tokens (alternative to --steps)")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint of --out), 'none', or a checkpoint dir")
    p.add_argument("--init-from", help="start from a spectra checkpoint or Hugging Face Llama directory")
    p.add_argument("--seed", type=int, help="model init seed")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although the data directory's fingerprint changed (data.allow_change=true)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="dotted override (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the merged config as JSON and exit")
    p.set_defaults(func=run)


def build_config(args):
    from spectra.train.config import TrainConfig, load_config_file

    cfg = load_config_file(args.config) if args.config else TrainConfig()
    flags = {}
    if args.preset:
        flags["model.preset"] = args.preset
    if args.family:
        flags["model.family"] = args.family
    if args.data:
        flags["data.dir"] = args.data
    if args.out:
        flags["out"] = args.out
    if args.steps is not None:
        flags["schedule.steps"] = args.steps
    if args.tokens is not None:
        flags["schedule.tokens"] = int(args.tokens)
    if args.resume:
        flags["resume"] = args.resume
    if args.init_from:
        from spectra.store import resolve

        flags["model.init_from"] = str(resolve(args.init_from))  # a Hub id OWNER/NAME: its local snapshot
    if args.allow_data_change:
        flags["data.allow_change"] = True
    if args.seed is not None:
        flags["train.seed"] = args.seed
    cfg = cfg.override(flags, "command line")
    return cfg.override(list(args.set) + list(args.overrides), "command line")


def run(args) -> int:
    import json

    cfg = build_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    import os

    from spectra.train import train
    from spectra.train.config import validate

    validate(cfg)  # a bad config is one line, before any note below (train() checks it again: cheap)
    if int(os.environ.get("RANK", "0")) == 0 and cfg.train.precision in ("auto", "fp32"):
        import sys

        import torch

        from spectra.train.cpu import cpu_has_fast_bf16

        on_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
        if on_cpu and cpu_has_fast_bf16():
            print("note: this CPU has native bf16 matmuls; train.precision=bf16 (autocast, fp32 master weights) "
                  "trains ~2x faster here. fp32 stays the default.", file=sys.stderr)
    run_dir = train(cfg)

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run: {run_dir}  final model: {run_dir / 'final'}")
    return 0
