"""Core MoE layer: sparse == dense reference, gradients, losses on known routings, constraints, controls."""
import io
import math

import pytest
import torch
from torch import nn

import moecnn
from moecnn.layers.balance import RoutingStats
from moecnn.registry import CONSTRAINTS, GATES, LOSSES

C, H = 6, 5


def conv_expert(cin=C, cout=8):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def make(n=4, k=2, seed=0, **kw):
    torch.manual_seed(seed)
    return moecnn.MoE([conv_expert() for _ in range(n)], k=k, **kw)


def dense_reference(layer, x):
    """Every expert on every image, multiplied by the layer's sparse weights."""
    w = layer.record.weights
    if w.dim() == 4:  # per-pixel weights B×N×H×W
        return sum(w[:, i : i + 1] * layer.experts[i](x) for i in range(layer.num_experts))
    return sum(w[:, i, None, None, None] * layer.experts[i](x) for i in range(layer.num_experts))


@pytest.mark.parametrize("gate", GATES.names())
@pytest.mark.parametrize("n,k", [(4, 1), (4, 2), (3, 3), (1, 1)])
def test_sparse_equals_dense_reference(gate, n, k):
    layer = make(n, k, gate=gate).eval()
    x = torch.randn(7, C, H, H)
    y = layer(x)
    torch.testing.assert_close(y, dense_reference(layer, x), atol=1e-5, rtol=1e-5)
    w = layer.record.weights
    if w.dim() == 4:
        w = w.movedim(1, -1).reshape(-1, n)
    torch.testing.assert_close(w.sum(1), torch.ones(w.shape[0]))
    assert ((w > 0).sum(1) == k).all()


def test_k_equals_n_is_full_softmax_mixture():
    layer = make(4, 4, noisy=False).eval()
    x = torch.randn(5, C, H, H)
    y = layer(x)
    g = torch.softmax(layer.gate(x), dim=1)
    ref = sum(g[:, i, None, None, None] * layer.experts[i](x) for i in range(4))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def _train_routing(layer):
    """Training-mode dispatch (the capacity applies) with experts' BatchNorm on running statistics."""
    layer.train()
    layer.experts.eval()
    return layer


def test_capacity_dispatch_matches_exact_when_nothing_overflows():
    exact = _train_routing(make(4, 2, noisy=False))
    cap = _train_routing(make(4, 2, capacity_factor=2.0, noisy=False))  # capacity B·k/N·2 = B: no overflow
    x = torch.randn(9, C, H, H)
    torch.testing.assert_close(exact(x), cap(x), atol=1e-5, rtol=1e-5)
    assert float(cap.record.dropped) == 0.0


def test_capacity_applies_in_training_only():
    layer = make(2, 1, capacity_factor=0.5, noisy=False)
    with torch.no_grad():
        layer.gate.fc.weight.zero_()
        layer.gate.fc.bias.copy_(torch.tensor([5.0, -5.0]))  # everything to expert 0
    x = torch.randn(8, C, H, H)
    y = layer.eval()(x)  # evaluation dispatches exactly: nothing dropped
    assert layer.record.dropped is None
    torch.testing.assert_close(y, layer.experts[0](x))


def test_capacity_dispatch_drops_overflow():
    layer = _train_routing(make(2, 1, capacity_factor=0.5, noisy=False))  # capacity ceil(0.5·B/2) per expert
    with torch.no_grad():
        layer.gate.fc.weight.zero_()
        layer.gate.fc.bias.copy_(torch.tensor([5.0, -5.0]))  # everything to expert 0
    x = torch.randn(8, C, H, H)
    y = layer(x)
    assert float(layer.record.dropped) == pytest.approx(0.75)  # 2 of 8 fit
    assert (y[2:] == 0).all() and y[:2].abs().sum() > 0


def test_expert_sees_only_its_routed_images():
    seen = {}

    class Probe(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i, self.conv = i, nn.Conv2d(C, C, 1)

        def forward(self, x):
            seen[self.i] = x.shape[0]
            return self.conv(x)

    # exact sub-batch sizes (the default pads them to bucket sizes, see test_exact_fast.py)
    layer = moecnn.MoE([Probe(i) for i in range(4)], k=1, noisy=False, bucketed=False).eval()
    x = torch.randn(10, C, H, H)
    layer(x)  # first forward also runs the one-image shape check
    seen.clear()
    layer(x)
    counts = layer.record.counts.tolist()
    assert {i: c for i, c in enumerate(counts) if c} == seen
    assert sum(seen.values()) == 10


@pytest.mark.parametrize("gate", GATES.names())
@pytest.mark.parametrize("balance", LOSSES.names() + CONSTRAINTS.names() + [None])
def test_every_parameter_gets_a_gradient(gate, balance):
    """Gate, noise and every routed expert receive finite gradients; unrouted experts receive none."""
    # a low τ so the hard constraints steer images to more experts within a few batches
    kw = dict(threshold=0.1) if balance in CONSTRAINTS else {}
    layer = make(4, 2, gate=gate, balance=balance, **kw).train()
    routed = torch.zeros(4, dtype=torch.bool)
    for step in range(6):
        x = torch.randn(16, C, H, H, requires_grad=True)
        y = layer(x)
        total, terms = moecnn.aux_loss(layer)
        assert torch.isfinite(y).all() and torch.isfinite(total)
        (y.square().mean() + total).backward()
        w = layer.record.weights
        routed |= (w.movedim(1, -1).reshape(-1, 4) if w.dim() == 4 else w).gt(0).any(0)
    assert int(routed.sum()) >= 3
    for name, p in layer.named_parameters():
        if name.startswith("experts."):
            i = int(name.split(".")[1])
            assert (p.grad is not None) == bool(routed[i]), name
        else:
            assert p.grad is not None, name
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    # the gate learns from the task loss through the softmax over the chosen logits
    assert any(p.grad.abs().sum() > 0 for p in layer.gate.parameters())


@pytest.mark.parametrize(
    "case",
    ["equal_logits", "k_equals_n", "single_expert", "batch_of_one", "masked"],
)
def test_no_nan_in_edge_cases(case):
    kw = dict(n=4, k=2, balance=["kl", "importance", "load", "switch", "entropy"])
    if case == "k_equals_n":
        kw.update(k=4)
    if case == "single_expert":
        kw.update(n=1, k=1)
    layer = make(kw.pop("n"), kw.pop("k"), balance=kw.pop("balance")).train()
    x = torch.randn(1 if case == "batch_of_one" else 6, C, H, H)
    if case == "equal_logits":
        with torch.no_grad():
            layer.gate.fc.weight.zero_()
            layer.gate.fc.bias.zero_()
            layer.noise.weight.zero_()
    if case == "masked":
        layer.set_controls(disabled=[0, 1])
    y = layer(x)
    total, _ = moecnn.aux_loss(layer)
    (y.mean() + total).backward()
    assert torch.isfinite(y).all() and torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    if case == "masked":
        assert (layer.record.weights[:, :2] == 0).all()


# ---------------------------------------------------------------- losses on hand-made routings

def stats_from_weights(weights, k=1, logits=None):
    weights = torch.as_tensor(weights, dtype=torch.float32)
    logits = torch.log(weights.clamp_min(1e-6)) if logits is None else logits
    return RoutingStats(
        logits=logits, noisy_logits=logits, noise_std=None, probs=weights, weights=weights,
        chosen=weights > 0, k=k,
    )


N = 4
UNIFORM_ONE_HOT = torch.eye(N).repeat(3, 1)  # 12 images spread evenly, one expert each
ALL_ON_ONE = torch.zeros(12, N).index_fill_(1, torch.tensor([0]), 1.0)


@pytest.mark.parametrize(
    "name,uniform,collapsed",
    [
        ("importance", 0.0, float(N)),  # CV² of (B,0,0,0) with unbiased variance = N
        ("kl", 0.0, math.log(N)),
        ("load", 0.0, float(N)),
        ("switch", 1.0, float(N)),
        ("entropy", -math.log(N), 0.0),
        ("column_entropy", 0.0, math.log(N)),
    ],
)
def test_loss_known_values(name, uniform, collapsed):
    fn = LOSSES.get(name)
    assert float(fn(stats_from_weights(UNIFORM_ONE_HOT))) == pytest.approx(uniform, abs=1e-5)
    assert float(fn(stats_from_weights(ALL_ON_ONE))) == pytest.approx(collapsed, abs=1e-5)


def test_z_loss_known_value():
    s = stats_from_weights(UNIFORM_ONE_HOT, logits=torch.zeros(12, N))
    assert float(LOSSES.get("z_loss")(s)) == pytest.approx(math.log(N) ** 2, rel=1e-6)


def test_load_loss_smooth_estimator_has_gradient():
    layer = make(4, 1, balance="load").train()
    layer(torch.randn(16, C, H, H))
    _, terms = moecnn.aux_loss(layer)
    terms["moe/load"].backward()
    assert layer.noise.weight.grad.abs().sum() > 0  # gradient flows through the noise scale


def test_aux_losses_are_weighted_and_named():
    layer = make(4, 2, balance={"kl": 0.5, "z_loss": 0.01}).train()
    layer(torch.randn(8, C, H, H))
    rec = layer.record
    assert set(rec.aux_losses) == {"kl", "z_loss"}
    torch.testing.assert_close(rec.aux_losses["kl"], 0.5 * rec.aux_raw["kl"])
    total, terms = moecnn.aux_loss(layer)
    torch.testing.assert_close(total, rec.aux_losses["kl"] + rec.aux_losses["z_loss"])


# ---------------------------------------------------------------- hard constraints

def force_logits(layer, bias):
    with torch.no_grad():
        layer.gate.fc.weight.zero_()
        layer.gate.fc.bias.copy_(torch.tensor(bias))


@pytest.mark.parametrize("name", CONSTRAINTS.names())
def test_hard_constraint_masks_overused_expert_in_training_only(name):
    layer = make(4, 1, balance=name).train()
    assert layer.noise is None  # no noise with hard constraints
    force_logits(layer, [5.0, 0.0, 0.0, 0.0])
    x = torch.randn(8, C, H, H)
    layer(x)  # batch 1: expert 0 takes everything, state moves past τ
    assert (layer.record.weights[:, 0] == 1).all()
    layer(x)  # batch 2: expert 0 is masked → weight exactly 0
    assert layer.record.masked[0]
    assert (layer.record.weights[:, 0] == 0).all()
    layer.eval()
    layer(x)
    assert (layer.record.weights[:, 0] == 1).all()  # no masking at evaluation


@pytest.mark.parametrize("name", CONSTRAINTS.names())
def test_hard_constraint_never_leaves_fewer_than_k(name):
    layer = make(4, 2, balance=name, threshold=-10.0).train()  # every expert "over-used"
    x = torch.randn(6, C, H, H)
    for _ in range(3):
        y = layer(x)
        assert torch.isfinite(y).all()
        assert int(layer.record.masked.sum()) == 2
        assert ((layer.record.weights > 0).sum(1) == 2).all()
    layer.set_controls(disabled=[3])
    layer(x)
    assert int(layer.record.masked.sum()) == 1 and not layer.record.masked[3]


def test_relative_state_update_formula():
    layer = make(4, 1, balance="relative").train()
    force_logits(layer, [5.0, 0.0, 0.0, 0.0])
    layer(torch.randn(8, C, H, H))
    # Imp = (8,0,0,0), B/N = 2: r = (8-2)/2, (0-2)/2 ...
    torch.testing.assert_close(layer.constraint.r, torch.tensor([3.0, -1.0, -1.0, -1.0]))


def test_mean_state_running_mean_and_decay():
    layer = make(4, 1, balance="mean").train()
    force_logits(layer, [5.0, 0.0, 0.0, 0.0])
    x = torch.randn(8, C, H, H)
    layer(x)
    torch.testing.assert_close(layer.constraint.m, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert int(layer.constraint.t) == 1
    ema = make(4, 1, balance="mean", decay=0.5).train()
    force_logits(ema, [5.0, 0.0, 0.0, 0.0])
    ema(x)
    torch.testing.assert_close(ema.constraint.m, torch.tensor([0.625, 0.125, 0.125, 0.125]))


@pytest.mark.parametrize("name", CONSTRAINTS.names())
def test_hard_state_survives_save_and_load(name):
    layer = make(4, 1, balance=name).train()
    layer(torch.randn(8, C, H, H))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fresh = make(4, 1, balance=name, seed=1)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for a, b in zip(layer.constraint.buffers(), fresh.constraint.buffers()):
        torch.testing.assert_close(a, b)
    assert any(b.abs().sum() > 0 for b in fresh.constraint.buffers())


# ---------------------------------------------------------------- inference controls

def test_force_expert_equals_that_expert():
    layer = make(4, 2).eval()
    x = torch.randn(5, C, H, H)
    for i in range(4):
        with moecnn.routing_override(layer, force=i):
            torch.testing.assert_close(layer(x), layer.experts[i](x))
    assert layer.forced_expert is None  # restored


def test_dense_equal_weights_and_disable():
    layer = make(4, 2).eval()
    x = torch.randn(5, C, H, H)
    moecnn.set_dense(layer)
    ref = sum(layer.experts[i](x) for i in range(4)) / 4
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    moecnn.set_routing(layer, dense=True, disabled=[1])
    ref = sum(layer.experts[i](x) for i in (0, 2, 3)) / 3
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    moecnn.reset_routing(layer)
    moecnn.disable_experts(layer, [0, 2])
    layer(x)
    assert (layer.record.weights[:, [0, 2]] == 0).all()


def test_set_k_at_test_time():
    layer = make(4, 2).eval()
    x = torch.randn(6, C, H, H)
    for k in (1, 3, 4):
        moecnn.set_k(layer, k)
        layer(x)
        assert ((layer.record.weights > 0).sum(1) == k).all()


def test_controls_on_whole_model_and_one_layer():
    model = moecnn.create_model("resnet10_tiny", num_classes=5, moe="conv", position=4, num_experts=3, k=2)
    names = list(moecnn.moe_layers(model))
    assert len(names) == 2
    moecnn.set_k(model, 1, layer=names[0])
    layers = moecnn.moe_layers(model)
    assert layers[names[0]].active_k == 1 and layers[names[1]].active_k == 2
    moecnn.force_expert(model, 2)
    model.eval()(torch.randn(2, 3, 16, 16))
    assert all((r.indices == 2).all() for r in moecnn.routing(model).values())


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=5), "k must be"),
        (dict(k=0), "k must be"),
        (dict(gate="nope"), "unknown gate 'nope'"),
        (dict(balance="nope"), "unknown balancing loss 'nope'"),
        (dict(balance=["relative", "mean"]), "at most one hard constraint"),
        (dict(capacity_factor=0.0), "capacity_factor"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(4, **{"k": 2, **kwargs})


def test_bad_controls():
    layer = make(4, 2)
    with pytest.raises(ValueError, match="k must satisfy"):
        layer.set_controls(k=5)
    with pytest.raises(ValueError, match="k must satisfy"):
        layer.set_controls(disabled=[0, 1, 2])  # one expert left < k=2
    with pytest.raises(ValueError, match="cannot force expert 9"):
        layer.set_controls(force=9)
    with pytest.raises(ValueError, match="cannot disable expert 4"):
        layer.set_controls(disabled=[4])


def test_mismatched_expert_shapes():
    layer = moecnn.MoE([conv_expert(cout=8), conv_expert(cout=9)], k=1)
    with pytest.raises(ValueError, match="one shape"):
        layer(torch.randn(2, C, H, H))


def test_no_experts():
    with pytest.raises(ValueError, match="at least one expert"):
        moecnn.MoE([], k=1)


# ---------------------------------------------------------------- moeify

def test_moeify_torchvision_model():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    moecnn.moeify(model, "layer3.1", num_experts=3, k=1, init="copy_noise", seed=0, balance="kl")
    layer = moecnn.moe_layers(model)["layer3.1"]
    assert layer.num_experts == 3
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    a, b = layer.experts[0].conv1.weight, layer.experts[1].conv1.weight
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.5)


def test_moeify_predicate_and_copy_and_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    orig = model[2].weight.detach().clone()
    moecnn.moeify(model, lambda n, m: isinstance(m, nn.Conv2d), num_experts=2, k=1, init="copy")
    assert len(moecnn.moe_layers(model)) == 2
    assert torch.equal(model[2].experts[1].weight, orig)
    with pytest.raises(ValueError, match="no submodule 'layer9'"):
        moecnn.moeify(model, "layer9", num_experts=2)
    with pytest.raises(ValueError, match="init must be"):
        moecnn.moeify(nn.Sequential(nn.Conv2d(3, 3, 1)), "0", num_experts=2, init="zeros")


def test_moeify_timm_model():
    timm = pytest.importorskip("timm", reason="timm is an optional extra")
    model = timm.create_model("resnet18", pretrained=False, num_classes=7)
    moecnn.moeify(model, "layer4", num_experts=2, k=1)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("capacity_factor", [None, 1.5])
def test_bf16_autocast_and_channels_last(capacity_factor):
    layer = make(4, 2, balance="kl", capacity_factor=capacity_factor).train()
    x = torch.randn(8, C, H, H).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        total, _ = moecnn.aux_loss(layer)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert layer.record.weights.dtype == torch.float32  # routing stays in float32
    (y.float().mean() + total).backward()


def test_routing_and_aux_loss_accept_a_layer_dict():
    model = moecnn.create_model("resnet10_tiny", num_classes=10, moe="resblock", balance={"kl": 0.5})
    model(torch.randn(4, 3, 32, 32))
    layers = moecnn.moe_layers(model)
    a, ta = moecnn.aux_loss(model)
    b, tb = moecnn.aux_loss(layers)
    assert torch.equal(a, b) and ta.keys() == tb.keys() == {"layer4.moe/kl"}
    assert moecnn.routing(layers).keys() == moecnn.routing(model).keys()
