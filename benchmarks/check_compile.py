"""Smoke check on an accelerator: the MoE model under torch.compile, bf16 autocast and channels_last."""
import torch

import moecnn
from moecnn.models import create_model

dev = torch.device("cuda")
for cf in (None, 1.25):
    model = create_model("resnet18", num_classes=100, moe="resblock", position=4, num_experts=4, k=2,
                         balance={"kl": 0.5}, capacity_factor=cf).to(dev, memory_format=torch.channels_last)
    eager_out = None
    x = torch.randn(64, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager_out = model(x).float()
    cm = torch.compile(model)
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = cm(x).float()
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = cm(x)
            loss = y.float().mean() + moecnn.aux_loss(model)[0]
        loss.backward()
        err = ((out - eager_out).norm() / eager_out.norm()).item()
        print(f"compile ok capacity_factor={cf}: rel err vs eager {err:.2e}, aux terms {list(moecnn.aux_loss(model)[1])}")
    except Exception as e:  # report, don't hide
        print(f"compile FAILED capacity_factor={cf}: {type(e).__name__}: {str(e)[:300]}")
