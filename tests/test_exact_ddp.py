"""DDP on CPU (2 gloo processes): channel-stacked execution with masked statistics, and the default layer with its
execution measured inside the first forward (forced on the CPU here), train exactly like exact dispatch — after
a few optimiser steps all give the same parameters and BatchNorm buffers, on both ranks."""
from __future__ import annotations

import copy
import os
import socket

import torch
import torch.multiprocessing as mp
from torch import nn

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import moecnn

    dist.init_process_group("gloo", rank=rank, world_size=world)
    moecnn.MoE._should_measure = lambda self, x, static: True  # the CUDA-only measurement, here on the CPU
    try:
        torch.manual_seed(0)
        experts = [nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1),
                                 nn.BatchNorm2d(4)) for _ in range(4)]
        layers = {}
        for name, kw in (("exact", dict(stacked=False, bucketed=False)), ("stacked", dict(stacked=True)),
                         ("default", {})):
            layer = moecnn.MoE(copy.deepcopy(experts), k=2, balance="kl", noisy=False, **kw)
            if layers:
                layer.gate.load_state_dict(layers["exact"][0].module.gate.state_dict())
            ddp = nn.parallel.DistributedDataParallel(layer, find_unused_parameters=layer.skips_idle_experts)
            layers[name] = (ddp, torch.optim.SGD(ddp.parameters(), lr=0.1))
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(STEPS):
            x = torch.randn(12, 4, 5, 5, generator=g)
            t = torch.randn(12, 4, 5, 5, generator=g)
            for ddp, opt in layers.values():
                y = ddp(x)
                loss = (y - t).square().mean() + moecnn.aux_loss(ddp.module)[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        torch.save({name: ddp.module.state_dict() for name, (ddp, _) in layers.items()},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_stacked_trains_like_exact(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for states in (r0, r1):  # on each rank: stacked == exact, parameters and buffers
        ref = states["exact"]
        for got in (states["stacked"], states["default"]):
            assert got.keys() == ref.keys()
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    params = [k for k in r0["exact"] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(r0["exact"][k], r1["exact"][k]) for k in params)  # DDP kept the ranks together
    torch.manual_seed(0)
    first = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))  # expert 0's first conv as initialised
    assert not torch.equal(r0["exact"]["experts.0.0.weight"], first[0].weight.detach())  # it trained
