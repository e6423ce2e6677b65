"""Data-free recipes split across processes with torch.distributed (torchrun).

    torchrun --nproc-per-node 2 -m quantkit apply int8-w8a16 MODEL -o OUT

Each rank streams a contiguous range of decoder blocks (rank r gets blocks [r*n/W, (r+1)*n/W)),
writes them to its own shard files in one shared temporary directory, and sends rank 0 the
shard headers and config entries; rank 0 also writes the embeddings, final norm and head, names
all shards, writes the index and config.json, and renames the directory into place. The tensors
and config equal a single process's; only the shard boundaries differ.

Only data-free recipes split this way: with calibration, block i needs the outputs of block
i-1, so ranks would wait on each other (docs/streaming.md says how calibrated schemes would
pipeline across GPUs instead). gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os

import torch

from quantkit.errors import RecipeError


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world()[1] > 1


def init(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def my_blocks(n_blocks: int) -> range:
    rank, size = world()
    return range(rank * n_blocks // size, (rank + 1) * n_blocks // size)


def check_data_free(passes) -> None:
    needing = [p.name for p in passes
               if p.execution != "block" or p.requirements() & {"calib", "act_stats"}]
    if needing:
        raise RecipeError(
            f"pass {needing[0]!r} needs calibration data or the whole model; only data-free recipes (weight-only "
            "round-to-nearest or observer) split across processes"
        )


def broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def finalize_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
