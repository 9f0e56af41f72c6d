"""Issue 13: every execution (default bucketed, channel-stacked, capacity buffers) computes in training exactly
what exact dispatch computes — outputs, input and parameter gradients, running statistics, num_batches_tracked —
with masked batch statistics (padding and dropped slots in no statistic, idle experts untouched); any dtype;
one state-dict layout whatever runs."""
import copy
import io

import pytest
import torch
from torch import nn

import moecnn
from moecnn.layers import StackedExperts
from moecnn.layers.grouped import masked_batch_norm
from moecnn.layers.moe import bucket_size

from _moe_equiv import assert_same_step, twins

C = 8


def conv_bn():
    return nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU())


def expert(norm: str, cin: int = C, width: int = 6):
    """Conv-norm-ReLU-Conv-norm with a residual-free two-layer body; ``norm``: bn, gn or none."""
    def nl(c):
        return {"bn": nn.BatchNorm2d, "gn": lambda c: nn.GroupNorm(2, c), "none": lambda c: nn.Identity()}[norm](c)

    return nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nl(width), nn.ReLU(), nn.Conv2d(width, C, 1), nl(C))


MODES = {
    "default": dict(),  # bucketed; stacked=None picks per-expert on the CPU
    "bucketed-experts": dict(stacked=False),
    "stacked": dict(stacked=True),
    "stacked-exact-size": dict(stacked=True, bucketed=False),
    "capacity-experts": dict(stacked=False, capacity_factor=4.0),
    "capacity-stacked": dict(stacked=True, capacity_factor=4.0),
}


def idle_last(layer, n):
    """Make expert n-1 the least likely for every image (never chosen unless k = N)."""
    with torch.no_grad():
        layer.gate.fc.bias[n - 1] -= 100.0


@pytest.mark.parametrize("mode", ["stacked", "capacity-stacked", "capacity-experts", "default"])
def test_issue_repro_training_equals_exact(mode):
    """The issue's repro: Conv-BN-ReLU experts, 16 images, k=2; filler copies used to enter BatchNorm (outputs off
    by 0.01-0.04, input gradients by 0.37) and idle experts' statistics moved."""
    torch.manual_seed(0)
    experts = [conv_bn() for _ in range(4)]
    a, b = twins(experts, k=2, noisy=False, **MODES[mode])
    for layer in (a, b):
        idle_last(layer, 4)
    x = torch.randn(16, C, 8, 8)
    before = copy.deepcopy(b.experts[3].state_dict())
    for _ in range(2):
        assert_same_step(a.train(), b.train(), x)
    assert b.record.counts[3] == 0
    for k, v in b.experts[3].state_dict().items():  # the idle expert: running stats and count untouched
        assert torch.equal(v, before[k]), k
    if b.record.dropped is not None:
        assert float(b.record.dropped) == 0.0


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_execution_equals_exact_in_training(norm, k, mode):
    """k = 1..N with an idle expert (k < N), two training steps then evaluation."""
    torch.manual_seed(k)
    n = 3
    a, b = twins([expert(norm) for _ in range(n)], k=k, noisy=False, **MODES[mode])
    if k < n:
        idle_last(a, n), idle_last(b, n)
    x = torch.randn(10, C, 5, 5)
    for step in range(2):
        assert_same_step(a.train(), b.train(), x + step)
    assert_same_step(a.eval(), b.eval(), x, grad=False)
    if mode.startswith("stacked") or mode == "capacity-stacked":
        assert isinstance(b.experts, StackedExperts)


@pytest.mark.parametrize("balance", ["relative", "mean"])
@pytest.mark.parametrize("mode", ["stacked", "default", "capacity-experts"])
def test_hard_constraints_equal_exact(balance, mode):
    """Hard constraints mask over-used experts (idle experts are common): same outputs, gradients, statistics
    and constraint state over several steps."""
    torch.manual_seed(1)
    a, b = twins([expert("bn") for _ in range(4)], k=1, balance=balance, threshold=0.05, **MODES[mode])
    x = torch.randn(12, C, 5, 5)
    masked = 0
    for step in range(4):
        assert_same_step(a.train(), b.train(), x * (1 + 0.1 * step))
        masked += int(b.record.masked.sum())
    assert masked > 0  # the constraint did act


@pytest.mark.parametrize("stacked", [False, True])
def test_dropped_slots_are_in_no_statistic(stacked):
    """Capacity overflow: expert 0 keeps its first cap sorted images; its BatchNorm statistics are those of
    exactly these images (the dropped ones appear nowhere)."""
    torch.manual_seed(0)
    experts = [conv_bn() for _ in range(2)]
    ref = copy.deepcopy(experts[0]).train()
    layer = moecnn.MoE(experts, k=1, noisy=False, capacity_factor=0.5, stacked=stacked).train()
    with torch.no_grad():
        layer.gate.fc.weight.zero_()
        layer.gate.fc.bias.copy_(torch.tensor([5.0, -5.0]))  # everything to expert 0: capacity 2 of 8
    x = torch.randn(8, C, 6, 6, requires_grad=True)
    y = layer(x)
    assert float(layer.record.dropped) == pytest.approx(0.75)
    xr = x.detach()[:2].clone().requires_grad_(True)
    yr = ref(xr)
    torch.testing.assert_close(y[:2], yr, atol=1e-5, rtol=1e-5)
    assert (y[2:] == 0).all()
    g = torch.randn_like(y)
    y.backward(g)
    (yr * g[:2] * layer.record.weights[:2, :1, None, None]).sum().backward()
    assert (x.grad[2:] == 0).all()  # a dropped image's slot shares a buffer row with a kept one: no gradient
    torch.testing.assert_close(x.grad[:2], xr.grad, atol=1e-5, rtol=1e-4)
    bn, bn_ref = layer.experts[0][1], ref[1]
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    assert int(layer.experts[1][1].num_batches_tracked) == 0  # expert 1 got nothing


def test_masked_batch_norm_gradcheck_with_idle_group():
    torch.manual_seed(0)
    x = torch.randn(5, 3 * 2, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)

    def f(x, w, b):
        y = masked_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, valid)
        return y * valid.repeat_interleave(2, 1)[:, :, None, None]  # real rows only, like the dispatch

    assert torch.autograd.gradcheck(f, (x, w, b))
    rm, rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    y = masked_batch_norm(x.detach(), rm, rv, w.detach(), b.detach(), True, 0.1, 1e-5, valid)
    ref = nn.functional.batch_norm(x.detach()[valid[:, 0]][:, :2], torch.zeros(2, dtype=torch.float64),
                                   torch.ones(2, dtype=torch.float64), w.detach()[:2], b.detach()[:2], True, 0.1)
    torch.testing.assert_close(y[valid[:, 0]][:, :2], ref)
    assert torch.equal(rm[4:], torch.zeros(2, dtype=torch.float64))  # the idle group's statistics: untouched
    assert torch.equal(rv[4:], torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gather_rows_backward_is_the_scatter_add_of_index_select(dtype):
    """Both gathers of the dispatch: images -> buffer rows (an image read by up to k rows; padding rows read
    image 0 and are left out of its gradient) and buffer rows -> slots (a row read once; padding rows none)."""
    from moecnn.layers.rows import gather_rows

    torch.manual_seed(0)
    b, k, total = 5, 2, 14
    row = torch.randperm(total)[: b * k]  # slot i*k+j sits in buffer row row[i*k+j]
    src = torch.zeros(total, dtype=torch.long)
    src[row] = torch.arange(b * k) // k
    real = torch.zeros(total, dtype=torch.bool)
    real[row] = True
    slot = torch.zeros(total, dtype=torch.long)
    slot[row] = torch.arange(b * k)
    x = torch.randn(b, 3, 2, 2, dtype=dtype, requires_grad=True)
    xb = gather_rows(x, src, row.view(b, k), torch.ones(b, k, dtype=torch.bool))
    g = torch.randn(total, 3, 2, 2, dtype=dtype) * real.view(-1, 1, 1, 1)  # padding rows: no gradient
    (gx,) = torch.autograd.grad(xb, x, g)
    ref = torch.zeros(b, 3, 2, 2, dtype=torch.float64).index_add_(0, src, g.double())
    torch.testing.assert_close(gx, ref.to(dtype))  # summed in float32 for bf16, rounded once
    assert torch.equal(xb, x.index_select(0, src))
    ob = torch.randn(total, 3, dtype=dtype, requires_grad=True)
    ys = gather_rows(ob, row, slot.view(-1, 1), real.view(-1, 1))
    gy = torch.randn(b * k, 3, dtype=dtype)
    (gob,) = torch.autograd.grad(ys, ob, gy)
    assert torch.equal(gob, torch.zeros(total, 3, dtype=dtype).index_add_(0, row, gy))
    assert torch.equal(gob[~real], torch.zeros_like(gob[~real]))


@pytest.mark.parametrize("mode", ["default", "stacked", "capacity-experts", "dropping-experts", "dropping-stacked"])
def test_gradcheck_float64_layer(mode):
    torch.manual_seed(0)
    kw = {"dropping-experts": dict(stacked=False, capacity_factor=0.5),
          "dropping-stacked": dict(stacked=True, capacity_factor=0.5)}.get(mode) or MODES[mode]
    layer = moecnn.MoE([expert("bn", width=3) for _ in range(3)], k=2, noisy=False, **kw).double().train()
    x = torch.randn(6, C, 3, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float64 and layer.record.weights.dtype == torch.float64
    if mode.startswith("dropping"):
        assert float(layer.record.dropped) > 0
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)


def test_torch_func_transforms_through_the_layer():
    """torch.func.grad equals autograd; forward-mode AD (jvp) equals a central difference."""
    from torch.func import functional_call, grad, jvp

    torch.manual_seed(0)
    layer = moecnn.MoE([expert("none", width=3) for _ in range(3)], k=2, noisy=False, stacked=False).double()
    x = torch.randn(5, C, 4, 4, dtype=torch.float64)
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def loss(p, x):
        return functional_call(layer, p, (x,)).square().sum()

    gp, gx = grad(loss, argnums=(0, 1))(params, x)
    xr = x.clone().requires_grad_(True)
    layer.zero_grad()
    layer(xr).square().sum().backward()
    torch.testing.assert_close(gx, xr.grad)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(gp[n], p.grad if p.grad is not None else torch.zeros_like(p), msg=n)
    v = torch.randn_like(x)
    _, tangent = jvp(lambda x: layer(x), (x,), (v,))
    eps = 1e-6
    with torch.no_grad():
        fd = (layer(x + eps * v) - layer(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stacked", [False, True])
def test_module_dtype_conversion(dtype, stacked):
    """``.double()``, ``.to(torch.bfloat16)``, ``.half()``: the layer runs in its dtype; routing in float32
    (float64 for a float64 layer), with the gate's weights cast up."""
    torch.manual_seed(0)
    layer = moecnn.MoE([expert("bn") for _ in range(3)], k=2, balance="kl", stacked=stacked)
    x = torch.randn(6, C, 4, 4)
    ref = copy.deepcopy(layer).eval()(x)
    layer = layer.to(dtype).eval()
    y = layer(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    route = torch.float64 if dtype == torch.float64 else torch.float32
    assert layer.record.weights.dtype == route
    tol = 1e-6 if dtype == torch.float64 else 0.1
    torch.testing.assert_close(y.float(), ref, atol=tol, rtol=tol)
    layer.train()(x.to(dtype)).float().sum().backward()
    assert layer.gate.fc.weight.grad.dtype == dtype


def test_bucket_sizes_and_static_shapes():
    assert [bucket_size(c, 1000) for c in (1, 2, 3, 5, 8, 9, 11, 16, 17, 300, 512)] == \
        [1, 2, 4, 8, 8, 10, 12, 16, 20, 320, 512]
    assert bucket_size(300, 260) == 260  # never more rows than images
    assert all(bucket_size(c, 10 ** 6) <= max(8, 1.25 * c) for c in range(1, 2000))
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, C, 1)

        def forward(self, x):
            seen.append(x.shape[0])
            return self.conv(x)

    layer = moecnn.MoE([Probe() for _ in range(4)], k=1, noisy=False, stacked=False)
    assert layer.static_shapes and layer.skips_idle_experts
    layer(torch.randn(37, C, 3, 3))
    seen.clear()
    layer(torch.randn(37, C, 3, 3))
    counts = [c for c in layer.record.counts.tolist() if c]
    assert seen == [bucket_size(c, 37) for c in counts]
    exact = moecnn.MoE([Probe() for _ in range(4)], k=1, noisy=False, stacked=False, bucketed=False)
    assert not exact.static_shapes
    assert not moecnn.MoE([conv_bn() for _ in range(2)], k=1, stacked=True).skips_idle_experts


def test_auto_execution_measures_once_per_shape_and_restores_state(monkeypatch):
    """stacked=None: on CUDA the faster execution is measured once per input shape (here forced on the CPU);
    the measurement leaves no trace in running statistics, and the result equals exact dispatch."""
    torch.manual_seed(0)
    a, b = twins([conv_bn() for _ in range(3)], k=2, noisy=False)
    assert b.stacked is None and b.can_stack
    calls = []
    real = moecnn.MoE._measure

    def spy(self, *args, **kw):
        calls.append(1)
        return real(self, *args, **kw)

    monkeypatch.setattr(moecnn.MoE, "_should_measure", lambda self, x, static: True)
    monkeypatch.setattr(moecnn.MoE, "_measure", spy)
    x = torch.randn(9, C, 5, 5)
    for _ in range(2):
        assert_same_step(a.train(), b.train(), x)
    assert len(calls) == 1 and list(b.executions.values())[0] in ("stacked", "experts")
    b.eval()(x)
    assert len(calls) == 2 and len(b.executions) == 2


def test_construction_and_first_forward_leave_the_global_rng_alone():
    """The stacking probe and the first-forward padding probe use their own generators (bit-exact resume)."""
    experts = [conv_bn() for _ in range(3)]
    after = []
    for stacked in (False, None):  # the same draws (gate initialisation) with and without the stacking probe
        torch.manual_seed(0)
        layer = moecnn.MoE(copy.deepcopy(experts), k=2, noisy=False, stacked=stacked).eval()
        after.append(torch.get_rng_state())
    assert layer.can_stack and torch.equal(after[0], after[1])
    layer(torch.ones(5, C, 4, 4))
    assert torch.equal(torch.get_rng_state(), after[1])


# ------------------------------------------------------------------ state dict


def test_state_dict_is_per_expert_whatever_executes(tmp_path):
    torch.manual_seed(0)
    experts = [expert("bn") for _ in range(3)]
    stacked = moecnn.MoE(copy.deepcopy(experts), k=2, stacked=True)
    plain = moecnn.MoE(copy.deepcopy(experts), k=2, stacked=False)
    want = {f"experts.{k}" for k in nn.ModuleList(experts).state_dict()}
    for layer in (stacked, plain):
        assert {k for k in layer.state_dict() if k.startswith("experts.")} == want
    stacked.train()(torch.randn(8, C, 4, 4))  # move its statistics
    buf = io.BytesIO()
    torch.save(stacked.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    plain.load_state_dict(sd)
    x = torch.randn(5, C, 4, 4)
    torch.testing.assert_close(plain.eval()(x), stacked.eval()(x), atol=1e-5, rtol=1e-5)
    back = moecnn.MoE(copy.deepcopy(experts), k=2, stacked=True)
    back.load_state_dict(plain.state_dict())
    torch.testing.assert_close(back.eval()(x), stacked(x), atol=1e-5, rtol=1e-5)
    # a dense block copied into expert 1 (the keys of the block itself)
    plain.experts[1].load_state_dict(experts[0].state_dict())
    assert torch.equal(plain.experts[1][0].weight, experts[0][0].weight)
    assert stacked.experts[1] is list(stacked.experts)[1]  # live modules, not copies


def test_old_stacked_checkpoints_load():
    """Checkpoints of the former stacked layout (``experts.net.<path>``: tensors concatenated along dim 0, one
    shared num_batches_tracked) load, converted to per-expert keys."""
    torch.manual_seed(0)
    experts = [expert("bn") for _ in range(3)]
    ref = moecnn.MoE(copy.deepcopy(experts), k=2, stacked=False)
    ref.train()(torch.randn(8, C, 4, 4))
    old = {k: v for k, v in ref.state_dict().items() if not k.startswith("experts.")}
    per = nn.ModuleList(list(ref.experts)).state_dict()
    for name in ref.experts[0].state_dict():
        ts = [per[f"{i}.{name}"] for i in range(3)]
        old[f"experts.net.{name}"] = ts[0] if ts[0].dim() == 0 else torch.cat(ts)
    for stacked in (True, False, None):
        layer = moecnn.MoE(copy.deepcopy(experts), k=2, stacked=stacked)
        if stacked is False:
            continue  # a plain list never had the stacked layout
        layer.load_state_dict(old)
        x = torch.randn(5, C, 4, 4)
        torch.testing.assert_close(layer.eval()(x), ref.eval()(x), atol=1e-5, rtol=1e-5)
