"""Process group setup and data parallelism, applied from outside model.py.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; we join the group with gloo on
CPU and NCCL on GPU. :func:`parallelize` wraps the model in DDP or shards it with
FSDP2 (``fully_shard`` per block, then the root). FSDP2 all-gathers a block's full
weights before its forward, so a TernaryLinear sees its whole matrix and computes
the per-shard scales for the configured MP degree exactly as in a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch import nn

from spectra.errors import SpectraError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    created: bool = False  # we created the process group (and destroy it at the end)
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun group when launched by torchrun; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SpectraError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise SpectraError(f"train.device '{device}' must be auto, cpu or cuda")
    d = Dist(rank, world, local, dev)
    if world > 1:
        if not td.is_initialized():
            td.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
            d.created = True
        from torch.distributed.device_mesh import init_device_mesh

        d.mesh = init_device_mesh(dev.type, (world,))
    return d


def close_distributed(d: Dist) -> None:
    if d.created and td.is_initialized():
        td.destroy_process_group()


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> nn.Module:
    """Recompute the activations of every ``every``-th block in the backward pass, in place.

    torchtitan's "full" activation checkpointing (``every`` = 1) and its every-Nth-block
    variant: a checkpointed block keeps only its input for backward and reruns its forward
    there, trading ~1/3 more block FLOPs for activation memory that no longer grows with
    depth. The block's ``forward`` is wrapped (non-reentrant ``torch.utils.checkpoint``)
    rather than the module, so parameter and state-dict names do not change. Apply before
    ``apply_compile`` and ``parallelize`` (the torchtitan order). The model has no dropout,
    so no RNG state needs replaying.
    """
    from torch.utils.checkpoint import checkpoint

    if every < 1:
        raise SpectraError(f"activation checkpointing every {every} blocks: must be >= 1")
    for i, block in enumerate(model.layers):
        if i % every:
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

        block.forward = forward
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile every transformer block in place (torchtitan style: before sharding; all
    blocks share one compiled graph, so compile time does not grow with depth)."""
    for block in model.layers:
        block.compile()
    return model


def parallelize(model: nn.Module, strategy: str, d: Dist) -> nn.Module:
    """Return the module to train: the model itself, a DDP wrapper, or the FSDP2-sharded model."""
    if strategy == "auto":
        strategy = "ddp" if d.distributed else "none"
    if strategy == "none":
        if d.distributed:
            raise SpectraError("train.parallel=none with several ranks; use ddp or fsdp")
        return model
    if not d.distributed:
        return model  # one rank: DDP/FSDP would only add overhead, same math
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block, mesh=d.mesh)
        fully_shard(model, mesh=d.mesh)
        return model
    raise SpectraError(f"train.parallel '{strategy}' must be auto, none, ddp or fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "cfg") else model


def set_grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on non-final micro-batches (gradient accumulation)."""
    import contextlib

    if hasattr(model, "no_sync") and not sync:  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_mean(values: list[float], d: Dist) -> list[float]:
    if not d.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    td.all_reduce(t)
    return (t / d.world).tolist()


def barrier(d: Dist) -> None:
    if d.distributed:
        td.barrier()


def broadcast_object(obj, d: Dist):
    if not d.distributed:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]
