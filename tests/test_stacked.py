"""Channel-stacked experts compute exactly what the list of experts computes (outputs, gradients, BN state)."""
import copy
import io

import pytest
import torch
from torch import nn

import moecnn
from moecnn.layers import StackedExperts
from moecnn.models import create_model
from moecnn.models.cifar_resnet import BasicBlock, _expert

from _moe_equiv import EXACT, assert_same_step, twins

C = 8


def pair(n=4, k=2, **kw):
    """(list MoE, stacked MoE) with the same gate and expert weights."""
    torch.manual_seed(0)
    experts = [_expert(BasicBlock, C, 16, 2, 6) for _ in range(n)]
    a = moecnn.MoE(copy.deepcopy(experts), k=k, noisy=False, **kw)
    b = moecnn.MoE(copy.deepcopy(experts), k=k, noisy=False, stacked=True, **kw)
    b.gate.load_state_dict(a.gate.state_dict())
    return a, b


def expert_grads_list(layer, i):
    return [p.grad for p in layer.experts[i].parameters()]


def test_eval_output_equals_list_experts_exactly():
    a, b = pair()
    a.eval(), b.eval()
    x = torch.randn(11, C, 8, 8)
    torch.testing.assert_close(b(x), a(x), atol=1e-5, rtol=1e-5)
    assert b.record.dropped is None


@pytest.mark.parametrize("capacity_factor", [None, 4.0, 1.5])
def test_training_matches_list_outputs_grads_and_bn_state(capacity_factor):
    """Training, stacked (bucketed or capacity buffers) vs each expert on exactly its images: outputs, every
    gradient, BN running statistics and counters agree (padding rows are in no statistic). With overflow
    (capacity 1.5), stacked equals the list experts on the same capacity buffers (the same slots dropped)."""
    torch.manual_seed(0)
    experts = [_expert(BasicBlock, C, 16, 2, 6) for _ in range(4)]
    ref = dict(stacked=False, capacity_factor=1.5) if capacity_factor == 1.5 else EXACT
    a, b = twins(experts, k=2, ref=ref, noisy=False, stacked=True, capacity_factor=capacity_factor)
    x = torch.randn(12, C, 8, 8)
    for _ in range(2):
        assert_same_step(a.train(), b.train(), x)
    if capacity_factor:
        assert (float(b.record.dropped) > 0) == (capacity_factor == 1.5)


def test_every_stacked_parameter_gets_a_gradient_and_no_nan():
    _, b = pair(capacity_factor=1.25)
    b.train()
    x = torch.randn(16, C, 8, 8)
    (b(x).square().mean()).backward()
    for name, p in b.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_forced_expert_and_dense_controls():
    a, b = pair()
    a.eval(), b.eval()
    x = torch.randn(5, C, 8, 8)
    b.set_controls(force=2)
    torch.testing.assert_close(b(x), a.experts[2](x), atol=1e-5, rtol=1e-5)
    b.set_controls(dense=True, disabled=[1])
    ref = sum(a.experts[i](x) for i in (0, 2, 3)) / 3
    torch.testing.assert_close(b(x), ref, atol=1e-5, rtol=1e-5)


def test_indexing_gives_a_copy_of_expert_i():
    a, b = pair()
    a.eval(), b.eval()
    x = torch.randn(3, C, 8, 8)
    assert len(b.experts) == 4
    e1 = b.experts[1]
    assert not e1.training
    torch.testing.assert_close(e1(x), a.experts[1](x), atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip():
    _, b = pair(capacity_factor=1.25)
    b.train()
    b(torch.randn(8, C, 8, 8))
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    _, c = pair(capacity_factor=1.25)
    c.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    b.eval(), c.eval()
    x = torch.randn(4, C, 8, 8)
    torch.testing.assert_close(c(x), b(x))


def test_channel_mixing_or_different_experts_are_refused():
    class Mixing(nn.Module):  # a forward that reduces over channels: cannot be stacked
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return y - y.mean(1, keepdim=True)

    with pytest.raises(ValueError, match="mixes channels"):
        moecnn.MoE([Mixing() for _ in range(3)], k=1, stacked=True)
    one = Mixing()  # identical copies (moeify init="copy") must be caught too
    with pytest.raises(ValueError, match="mixes channels"):
        moecnn.MoE([copy.deepcopy(one) for _ in range(3)], k=1, stacked=True)
    with pytest.raises(ValueError, match="momentum=None"):
        moecnn.MoE([nn.Sequential(nn.Conv2d(C, 4, 1), nn.BatchNorm2d(4, momentum=None)) for _ in range(2)],
                   k=1, stacked=True)
    with pytest.raises(ValueError, match="differs from expert 0"):  # a training-only setting differs
        moecnn.MoE([nn.Sequential(nn.Conv2d(C, 4, 1), nn.BatchNorm2d(4, momentum=m)) for m in (0.1, 0.9)],
                   k=1, stacked=True)
    with pytest.raises(ValueError, match="need parameters"):
        moecnn.MoE([nn.ReLU(), nn.ReLU()], k=1, in_channels=C, stacked=True)
    with pytest.raises(ValueError, match="cannot probe these experts"):  # runs only on 1×1 inputs
        moecnn.MoE([nn.Sequential(nn.Conv2d(C, 4, 1), nn.Flatten(), nn.Linear(4, 2)) for _ in range(2)],
                   k=1, in_channels=C, stacked=True)
    with pytest.raises(ValueError, match="mixes channels"):  # a channel shuffle
        moecnn.MoE([nn.Sequential(nn.Conv2d(C, 4, 1), nn.ChannelShuffle(2)) for _ in range(2)], k=1, stacked=True)
    auto = moecnn.MoE([Mixing() for _ in range(3)], k=1)  # stacked=None: what does not stack runs per expert
    assert type(auto.experts) is nn.ModuleList
    with pytest.raises(ValueError, match="one architecture"):
        moecnn.MoE([nn.Conv2d(C, 4, 1), nn.Conv2d(C, 4, 3, padding=1)], k=1, stacked=True)


def test_stacked_model_from_config_trains():
    model = create_model("resnet10_tiny", num_classes=10, moe="resblock", position=4, num_experts=4, k=2,
                         balance={"kl": 0.5}, capacity_factor=1.25, stacked=True)
    assert isinstance(model.layer4.moe.experts, StackedExperts)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loss = nn.functional.cross_entropy(model(x), y) + moecnn.aux_loss(model)[0]
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_spatial_gate_with_stacked_experts():
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU()) for _ in range(3)]
    a = moecnn.MoE(copy.deepcopy(experts), gate="spatial", k=2, noisy=False).eval()
    b = moecnn.MoE(copy.deepcopy(experts), gate="spatial", k=2, noisy=False, stacked=True).eval()
    b.gate.load_state_dict(a.gate.state_dict())
    x = torch.randn(4, C, 6, 6)
    torch.testing.assert_close(b(x), a(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(groups=2), dict(dilation=2, padding=2), dict(stride=2, bias=False),
                                dict(padding="same")], ids=["groups", "dilation", "stride-nobias", "same"])
def test_conv_variants_and_bn_settings_stack_exactly(kw):
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Conv2d(C, 8, 3, **({"padding": 1} | kw)), nn.BatchNorm2d(8, momentum=0.3),
                             nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, affine=False)) for _ in range(3)]
    a = moecnn.MoE(copy.deepcopy(experts), k=2, noisy=False, capacity_factor=2.0)
    b = moecnn.MoE(copy.deepcopy(experts), k=2, noisy=False, capacity_factor=2.0, stacked=True)
    b.gate.load_state_dict(a.gate.state_dict())
    x = torch.randn(6, C, 9, 9)
    for _ in range(2):  # training updates then evaluation
        torch.testing.assert_close(b.train()(x), a.train()(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.eval()(x), a.eval()(x), atol=1e-5, rtol=1e-5)
    for e in range(3):
        assert int(b.experts[e][1].num_batches_tracked) == int(a.experts[e][1].num_batches_tracked)
        torch.testing.assert_close(b.experts[e][1].running_var, a.experts[e][1].running_var)


def test_dtype_device_and_frozen_parameters_are_kept():
    experts = [nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4)).double() for _ in range(2)]
    for e in experts:
        e[0].weight.requires_grad_(False)
    b = moecnn.MoE(experts, k=1, noisy=False, stacked=True)
    assert b.experts[1][0].weight.dtype == torch.float64 and not b.experts[1][0].weight.requires_grad
    b.train()(torch.randn(4, C, 5, 5, dtype=torch.float64)).sum().backward()
    assert b.experts[0][0].weight.grad is None and b.experts[0][0].bias.grad is not None
    b.to(torch.bfloat16)
    assert b.experts[1][0].weight.dtype == torch.bfloat16


def test_stacked_bf16_autocast_channels_last():
    _, b = pair(capacity_factor=1.25)
    b = b.to(memory_format=torch.channels_last).train()
    x = torch.randn(8, C, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = b(x)
    assert torch.isfinite(y.float()).all()
    y.float().mean().backward()
    assert all(p.grad is not None for p in b.experts.parameters())


@pytest.mark.parametrize("gate", moecnn.GATES.names())
@pytest.mark.parametrize("balance", moecnn.LOSSES.names() + moecnn.CONSTRAINTS.names() + [None])
def test_every_gate_and_balance_with_stacked_experts(gate, balance):
    """timm-style sweep: stacked capacity dispatch trains with every gate and balancing variant; every
    parameter (gate, noise, all experts) gets a finite gradient in one step."""
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Conv2d(C, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(4)]
    layer = moecnn.MoE(experts, gate=gate, k=2, balance=balance, capacity_factor=1.25, stacked=True).train()
    x = torch.randn(16, C, 6, 6)
    y = layer(x)
    total, _ = moecnn.aux_loss(layer)
    assert torch.isfinite(y).all() and torch.isfinite(total)
    (y.square().mean() + total).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_moeify_torchvision_block_with_stacked_copies_keeps_the_function():
    """moeify(..., init="copy", stacked=True) on a torchvision ResNet block (residual + downsample): every
    expert is the original block, so the model's output is unchanged whatever the routing."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    moecnn.moeify(model, "layer3.0", num_experts=4, k=2, init="copy", stacked=True)
    assert isinstance(model.layer3[0].experts, StackedExperts)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_subclassed_norm_with_fused_activation_stacks():
    """A BatchNorm subclass with an activation submodule (like timm's BatchNormAct2d) stacks: its own forward runs
    on the stacked tensors, its batch statistics masked per expert."""
    class BNAct(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(super().forward(x))

    torch.manual_seed(0)
    a, b = twins([nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), BNAct(4)) for _ in range(3)], k=2, noisy=False,
                 stacked=True)
    x = torch.randn(7, C, 5, 5)
    assert_same_step(a.train(), b.train(), x)
    assert_same_step(a.eval(), b.eval(), x, grad=False)
