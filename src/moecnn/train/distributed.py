"""Data-parallel helpers: torchrun env-var initialisation, rank queries, reductions.

Under ``torchrun --nproc_per_node=G`` (``WORLD_SIZE`` > 1 in the environment) :func:`init` starts a process
group (nccl on CUDA, gloo otherwise) and gives each rank its own device. Single-process runs need nothing.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device asks for CUDA but no GPU is available; use train.device=cpu")
        return torch.device(spec if ":" in spec else f"cuda:{local_rank}")
    if spec != "cpu":
        raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got '{spec}'")
    return torch.device("cpu")


def init(device_spec: str = "auto", backend: str = "auto") -> Dist:
    """``backend``: auto (nccl on CUDA, gloo on CPU), nccl or gloo. With gloo, ranks may outnumber the
    GPUs and then share them (rank r uses cuda:r mod G): a correctness run of the multi-GPU path on one GPU,
    not a speed measurement. NCCL needs one GPU per rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=pick_device(device_spec))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device("cuda" if device_spec == "cuda" else device_spec, local)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("train.dist_backend=nccl needs CUDA; use train.dist_backend=gloo on the CPU")
    if device.type == "cuda":  # under torchrun each rank takes cuda:LOCAL_RANK (cuda:N in the config is ignored)
        n = torch.cuda.device_count()
        if local >= n and backend == "nccl":
            raise RuntimeError(f"local rank {local} has no GPU of its own ({n} visible): start at most {n} "
                               f"processes per node, or use train.dist_backend=gloo to share GPUs (tests only)")
        device = torch.device(f"cuda:{local % n}")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # rank 0 evaluates (validation, COCO AP, the final test) while the others wait in a collective: allow
        # that as long as a full evaluation may take ($MOECNN_DIST_TIMEOUT seconds, default 2 h)
        timeout = datetime.timedelta(seconds=float(os.environ.get("MOECNN_DIST_TIMEOUT", 7200)))
        dist.init_process_group(backend=backend, timeout=timeout)
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op without a process group); returns ``t``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def average_buffers(model: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks so every rank evaluates and saves the same model.

    DDP only broadcasts buffers at the start of a forward, so without this each rank keeps the statistics
    of its own last batch. Other buffers (hard-constraint state) are left alone: the MoE layer keeps them
    in sync itself (tests/test_ddp.py checks that)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    bufs = [b for m in bns for b in (m.running_mean, m.running_var) if b is not None]
    if bufs:
        flat = torch.cat([b.reshape(-1).float() for b in bufs])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
            b.copy_(v.view_as(b))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
