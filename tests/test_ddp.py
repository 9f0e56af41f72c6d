"""DDP on CPU: 2 gloo processes train the tiny config; both ranks end with identical parameters and
identical hard-constraint buffers, and only rank 0 writes the run directory."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

TINY = [
    "data.image_size=16", "data.synthetic_train_size=192", "data.val_size=64", "data.synthetic_test_size=32",
    "model.width=8", "optim.batch_size=64", "train.epochs=1", "log.tensorboard=false", "log.progress=none",
    "train.device=cpu", "model.balance=relative", "train.deterministic=true",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str, out: str, extra=()) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from moecnn.train import distributed, load_config
    from moecnn.train.loop import run

    try:
        final, model = run(load_config("tiny", TINY + list(extra)), run_dir)
        torch.save({"state": model.state_dict(), "final": final}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


@pytest.mark.parametrize("extra", [(), ("model.capacity_factor=1.25", "model.stacked=true", "train.dist_backend=gloo")],
                         ids=["exact", "stacked-capacity"])
def test_ddp_two_ranks_stay_identical(tmp_path, extra):
    """Exact dispatch (DDP must allow unused experts) and stacked capacity dispatch (every parameter is used
    every step, so DDP runs without find_unused_parameters)."""
    run_dir = tmp_path / "run"
    mp.start_processes(_worker, args=(2, _free_port(), str(run_dir), str(tmp_path), extra), nprocs=2, join=True,
                       start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    a, b = r0["state"], r1["state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    r = a["layer4.moe.constraint.r"]
    assert r.abs().sum() > 0  # the constraint state moved, identically on both ranks
    assert r0["final"] == r1["final"] and r0["final"]["test"]["images"] == 32
    # only rank 0 wrote files; the log covers the global batch (2 ranks x 32 images per step)
    assert (run_dir / "final.json").is_file()
    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(sum(rec["routing"]["layer4.moe"]["routed"]) - 2) < 1e-4


def test_dist_backend_errors(monkeypatch):
    """NCCL on the CPU and an unknown backend name each stop with a one-line error that says what to do."""
    from moecnn.train import distributed, load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="dist_backend=gloo"):
        distributed.init("cpu", "nccl")
    with pytest.raises(ValueError, match="train.dist_backend must be"):
        load_config("tiny", ["train.dist_backend=mpi"])
