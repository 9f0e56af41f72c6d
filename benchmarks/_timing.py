"""What the benchmark scripts share: device setup, distinct random batches, step timing, GPU kernel time per
step and writing the results."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def device_setup(device: str):
    """(device, is CUDA, a synchronise function, the memory format of inputs); TF32 on, as in training."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return dev, cuda, sync, torch.channels_last if cuda else torch.contiguous_format


def random_batches(n: int, batch: int, size: int, classes: int, dev, memory_format):
    """``n`` distinct random image batches (3 × size × size) and labels, seeded, on ``dev``."""
    g = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(batch, 3, size, size, device=dev, generator=g).contiguous(memory_format=memory_format)
          for _ in range(n)]
    return xs, [torch.randint(0, classes, (batch,), device=dev, generator=g) for _ in range(n)]


def kernel_ms(step, sync, steps: int) -> float:
    """GPU kernel time per call of ``step`` (sum of CUDA kernel self time under torch.profiler), in ms."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    total_us = sum(e.self_device_time_total for e in prof.key_averages()
                   if str(getattr(e, "device_type", "")).endswith("CUDA"))
    return total_us / 1e3 / steps


def _warm_up(step, sync, n: int) -> float:
    """Seconds for ``n`` calls of ``step``, closed by ``sync``."""
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - t0


def time_steps(step, sync, warmup: int, steps: int):
    """(warm-up seconds, ms per step, the last step's return value): ``warmup`` calls of ``step``, then ``steps``
    timed calls, each phase closed by ``sync``."""
    warm_s = _warm_up(step, sync, warmup)
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
        out = step()
    sync()
    return warm_s, (time.perf_counter() - t0) * 1e3 / steps, out


def step_times(step, sync, warmup: int, steps: int):
    """(warm-up seconds, ms of each of ``steps`` timed calls): like :func:`time_steps`, but every call is
    synchronised and timed on its own, so a median can leave out the rare slow step (e.g. the first step that
    meets a new buffer shape, when cuDNN autotunes it)."""
    warm_s = _warm_up(step, sync, warmup)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return warm_s, out


def write_results(results: dict, table: list, out) -> None:
    """Print the markdown ``table``, keep it in ``results`` and write ``results`` as JSON to ``out`` (if given)."""
    print("\n" + "\n".join(table))
    results["table"] = table
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
