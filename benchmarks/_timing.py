"""What the benchmark scripts share: device setup, distinct random batches and GPU kernel time per step."""
from __future__ import annotations

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
