"""RetinaNet with MoE heads: every variant trains (finite loss, all trainable parameters get gradients),
routing is recorded per FPN level, detections are attributed to experts, weights load into experts."""
from __future__ import annotations

import pytest
import torch

import moecnn
from moecnn import create_model, routing_override
from moecnn.models.retinanet import MoERetinaNet, _MoEHeadMixin
from moecnn.registry import CONSTRAINTS, GATES, LOSSES




SMALL = dict(num_classes=4, min_size=64, max_size=64, fpn_channels=32, head_convs=1, num_experts=3, k=2)


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([2, 3])},
    ]
    return images, targets


def _train_step(model):
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    return losses


LEVEL_GATES = [g for g in GATES.names() if g != "spatial"]


@pytest.mark.parametrize("heads", ["both", "cls", "reg"])
@pytest.mark.parametrize("routing", ["level", "anchor"])
def test_heads_and_routing(heads, routing):
    torch.manual_seed(0)
    model = create_model("retinanet_resnet18_fpn_moe", moe_heads=heads, routing=routing, **SMALL)
    losses = _train_step(model)
    assert set(losses) == {"classification", "bbox_regression", "aux"}
    recs = model.head.level_records
    assert set(recs) == {"both": {"cls", "reg"}, "cls": {"cls"}, "reg": {"reg"}}[heads]
    for key, per_level in recs.items():
        assert len(per_level) == 5  # P3..P7
        for r in per_level:
            assert r.weights.shape[:2] == (2, 3)
            assert r.weights.dim() == (2 if routing == "level" else 4)
            assert torch.allclose(r.weights.sum(1), torch.ones(()), atol=1e-5)
    # eval: detections carry levels and producing experts
    model.eval()
    model.score_thresh = 0.0
    dets = model(_batch()[0])
    d = dets[0]
    assert len(d["boxes"]) > 0 and {"levels", "experts"} <= set(d)
    assert d["experts"].min() >= 0 and d["experts"].max() < 3 and d["levels"].max() <= 4
    with routing_override(model, force=1):
        forced = model(_batch()[0])
    assert (forced[0]["experts"] == 1).all()


@pytest.mark.parametrize("gate", LEVEL_GATES)
def test_level_gates(gate):
    model = create_model("retinanet_resnet18_fpn_moe", gate=gate, **SMALL)
    _train_step(model)


@pytest.mark.parametrize("balance", LOSSES.names() + CONSTRAINTS.names() + [None, "kl:0.25,z_loss:0.001"])
def test_balancing(balance):
    torch.manual_seed(0)  # one step of 20 routed slots must reach all 3 experts: fix the init (order-independent)
    model = create_model("retinanet_resnet18_fpn_moe", balance=balance, **SMALL)
    losses = _train_step(model)
    if balance is None or balance in CONSTRAINTS:
        assert losses["aux"].item() == 0.0
    if balance == "relative":  # hard-constraint state is updated in training
        assert model.head.classification_head.moe.constraint.r.abs().sum() > 0


def test_gate_mode_mismatch_is_an_error():
    with pytest.raises(ValueError, match="spatial gate"):
        create_model("retinanet_resnet18_fpn_moe", routing="anchor", gate="gap_fc", **SMALL)
    with pytest.raises(ValueError, match="per-image gate"):
        create_model("retinanet_resnet18_fpn_moe", routing="level", gate="spatial", **SMALL)


def test_dense_models_registered_and_train():
    for name in ("retinanet_resnet18_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_moe"):
        assert name in moecnn.DETECTORS and name not in moecnn.MODELS
    model = create_model("retinanet_resnet18_fpn", **SMALL)
    losses = _train_step(model)
    assert "aux" not in losses and model.head.level_records == {}
    assert not moecnn.moe_layers(model)


def test_frozen_backbone_and_weights_into_experts(tmp_path):
    torch.manual_seed(1)
    dense = create_model("retinanet_resnet18_fpn", **SMALL)
    path = tmp_path / "dense.pt"
    torch.save(dense.state_dict(), path)
    model = create_model("retinanet_resnet18_fpn_moe", weights=str(path), freeze_backbone=True, expert_noise=0.0, **SMALL)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in dense.backbone.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())  # BN frozen
    sd_dense = dense.state_dict()
    for k, v in model.backbone.state_dict().items():
        if k in dict(dense.backbone.state_dict()) and not k.endswith("num_batches_tracked"):
            if v.shape == sd_dense["backbone." + k].shape:
                assert torch.equal(v, sd_dense["backbone." + k]), k
    for e in range(3):
        ex = model.head.classification_head.moe.experts[e]
        assert torch.equal(ex.out.weight, dense.head.classification_head.cls_logits.weight)
        assert torch.equal(ex.conv[0][0].weight, dense.head.classification_head.conv[0][0].weight)
    _train_step(model)
    assert all(p.grad is None for p in model.backbone.parameters())


def test_analyze_attributes_gt_to_levels():
    model = create_model("retinanet_resnet18_fpn_moe", routing="anchor", **SMALL)
    images, targets = _batch()
    dets, info = model.analyze(images, targets)
    assert len(dets) == 2 and len(info["gt"]) == 2
    g = info["gt"][1]
    assert g["levels"].shape == (2,) and g["weights_cls"].shape == (2, 3)
    assert torch.allclose(g["weights_cls"].sum(1), torch.ones(2), atol=1e-5)
    # the bigger box is assigned to a coarser (or equal) level than the tiny one
    assert g["levels"][0] >= g["levels"][1]
    assert len(info["level_weights"]["cls"]) == 5
    assert isinstance(model, MoERetinaNet) and isinstance(model.head.classification_head, _MoEHeadMixin)


@pytest.mark.parametrize("routing", ["level", "anchor"])
def test_bf16_autocast_train_and_eval(routing):
    model = create_model("retinanet_resnet18_fpn_moe", routing=routing, **SMALL)
    images, targets = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _train_step(model)
        assert all(torch.isfinite(v) for v in losses.values())
        model.eval()
        model.score_thresh = 0.0
        dets = model(images)
    assert dets[0]["boxes"].dtype == torch.float32 and len(dets[0]["experts"]) > 0
    assert model.head.level_records["cls"][0].weights.dtype == torch.float32


def test_imagenet_backbone_weights_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(2)
    net = resnet18()
    path = tmp_path / "r18.pt"
    torch.save(net.state_dict(), path)
    model = create_model("retinanet_resnet18_fpn_moe", weights_backbone=str(path), **SMALL)
    assert torch.equal(model.backbone.body.conv1.weight, net.conv1.weight)
    assert torch.equal(model.backbone.body.layer4[1].bn2.running_var, net.layer4[1].bn2.running_var)
    bad = tmp_path / "bad.pt"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="neither a RetinaNet state dict nor a ResNet one"):
        create_model("retinanet_resnet18_fpn_moe", weights=str(bad), **SMALL)


@pytest.mark.parametrize("head_norm", ["none", "gn"])
def test_stacked_head_experts_match_list_experts(tmp_path, head_norm):
    """Dense head weights copied (with the same noise) into list and into stacked experts: same detections
    and losses; the stacked model trains with every parameter receiving a gradient."""
    kw = dict(SMALL, fpn_channels=32, head_norm=head_norm)
    torch.manual_seed(2)
    dense = create_model("retinanet_resnet18_fpn", **kw)
    path = tmp_path / "dense.pt"
    torch.save(dense.state_dict(), path)
    a = create_model("retinanet_resnet18_fpn_moe", weights=str(path), expert_noise=0.05, packed=False, **kw)
    b = create_model("retinanet_resnet18_fpn_moe", weights=str(path), expert_noise=0.05, stacked=True, **kw)
    assert not b.head.classification_head.packed  # an explicit execution of the layer is per level
    assert isinstance(b.head.classification_head.moe.experts, moecnn.layers.StackedExperts)
    for ha, hb in ((a.head.classification_head, b.head.classification_head),
                   (a.head.regression_head, b.head.regression_head)):
        hb.moe.gate.load_state_dict(ha.moe.gate.state_dict())
        if ha.moe.noise is not None:
            hb.moe.noise.load_state_dict(ha.moe.noise.state_dict())
        torch.testing.assert_close(hb.moe.experts[1].out.weight, ha.moe.experts[1].out.weight)
    images, targets = _batch()
    a.eval(), b.eval()
    with torch.no_grad():
        da, db = a(images), b(images)
    for x, y in zip(da, db):
        torch.testing.assert_close(y["boxes"], x["boxes"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y["scores"], x["scores"], atol=1e-5, rtol=1e-4)
    _train_step(b)


# ---------------------------------------------------------------------------------------------------------
# packed levels: every expert once on all FPN levels in one map == one MoE call per level
# ---------------------------------------------------------------------------------------------------------
from moecnn.models.retinanet import HeadTower, pack_layout, pack_levels, pack_mask  # noqa: E402


@pytest.mark.parametrize("sizes", [[(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)],
                                   [(3, 20), (2, 10), (1, 5)], [(6, 5)], [(2, 2), (7, 3)]])
def test_pack_layout_keeps_levels_apart(sizes):
    """Levels fit in the map, never overlap and never touch (not even diagonally): a 3×3 window centred on
    one level's cell sees no other level's cell."""
    height, width, pos = pack_layout(sizes)
    owner = -torch.ones(height, width, dtype=torch.long)
    for i, ((h, w), (t, l)) in enumerate(zip(sizes, pos)):
        assert t >= 0 and l >= 0 and t + h <= height and l + w <= width
        assert (owner[t:t + h, l:l + w] == -1).all()
        owner[t:t + h, l:l + w] = i
    padded = torch.nn.functional.pad(owner, (1, 1, 1, 1), value=-1)
    for i, ((h, w), (t, l)) in enumerate(zip(sizes, pos)):
        window = padded[t:t + h + 2, l:l + w + 2]
        assert ((window == -1) | (window == i)).all()
    mask = pack_mask(sizes, (height, width, pos), "cpu")
    assert mask.sum() == sum(h * w for h, w in sizes) and torch.equal(mask[0, 0] > 0, owner >= 0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_tower_on_packed_levels_equals_each_level(channels_last):
    torch.manual_seed(0)
    tower = HeadTower(6, 2, 3, flatten=False, num_convs=3).double()
    for p in tower.parameters():  # far from the tiny default initialisation, so errors would show
        torch.nn.init.normal_(p, std=0.5)
    sizes = [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)]
    xs = [torch.randn(2, 6, h, w, dtype=torch.float64) for h, w in sizes]
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    layout = pack_layout(sizes)
    canvas = pack_levels(xs, layout)
    assert canvas.is_contiguous(memory_format=torch.channels_last) == channels_last
    out = tower(canvas, pack_mask(sizes, layout, "cpu", torch.float64))
    for x, (t, l) in zip(xs, layout[2]):
        ref = tower(x)
        torch.testing.assert_close(out[..., t:t + x.shape[-2], l:l + x.shape[-1]], ref, rtol=1e-12, atol=1e-12)


def _twin_models(routing, **kw):
    torch.manual_seed(3)
    a = create_model("retinanet_resnet18_fpn_moe", routing=routing, **dict(SMALL, head_convs=2, **kw))
    b = create_model("retinanet_resnet18_fpn_moe", routing=routing, packed=False, **dict(SMALL, head_convs=2, **kw))
    b.load_state_dict(a.state_dict())
    for m in (a, b):  # larger head weights than the tiny default initialisation, so differences would show
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in m.head.named_parameters():
                if ".experts." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    assert a.head.classification_head.packed and a.head.regression_head.packed
    assert not b.head.classification_head.packed
    return a, b


@pytest.mark.parametrize("routing", ["level", "anchor"])
@pytest.mark.parametrize("balance", ["kl", "relative"])
def test_packed_heads_equal_per_level_heads_in_training(routing, balance):
    """Training step of the packed heads vs one MoE call per level (same weights, same noise draws):
    losses, every gradient (backbone, gates, noise, experts), routing records and hard-constraint state."""
    a, b = _twin_models(routing, balance=balance)
    images, targets = _batch()
    out = []
    for m in (a, b):
        m.train()
        torch.manual_seed(7)
        losses = m(images, targets)
        sum(losses.values()).backward()
        out.append((losses, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}, m.head.level_records))
    (la, ga, ra), (lb, gb, rb) = out
    for key in lb:
        torch.testing.assert_close(la[key], lb[key], rtol=1e-5, atol=1e-6)
    assert set(ga) == set(gb)
    for name in gb:  # float32 sums in another order: tolerance relative to each tensor's scale
        scale = gb[name].abs().max().item()
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=name)
    for head in rb:
        for x, y in zip(ra[head], rb[head]):
            torch.testing.assert_close(x.weights, y.weights)
            torch.testing.assert_close(x.indices, y.indices)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        torch.testing.assert_close(ta, tb, msg=na)  # hard-constraint state and every other buffer


def _head_outputs(model, images):
    """The heads' raw outputs (detections saturate and tie with the large test weights, so compare these)."""
    batch, _ = model.transform(images)
    return model.head(list(model.backbone(batch.tensors).values()))


def _assert_heads_close(a, b, images):
    ha, hb = _head_outputs(a, images), _head_outputs(b, images)
    for key in hb:
        scale = hb[key].abs().max().item()
        torch.testing.assert_close(ha[key], hb[key], rtol=1e-5, atol=1e-5 * scale, msg=key)


@pytest.mark.parametrize("controls", [dict(force=1), dict(disabled=[0]), dict(k=1), dict(dense=True)])
@pytest.mark.parametrize("routing", ["level", "anchor"])
def test_packed_heads_equal_per_level_heads_under_routing_controls(controls, routing):
    a, b = _twin_models(routing)
    images, _ = _batch()
    a.eval(), b.eval()
    with torch.no_grad(), routing_override(a, **controls), routing_override(b, **controls):
        _assert_heads_close(a, b, images)


def test_packed_channels_last_and_refusals():
    a, b = _twin_models("level")
    images, targets = _batch()
    a.to(memory_format=torch.channels_last)
    a.eval(), b.eval()
    with torch.no_grad():
        _assert_heads_close(a, b, images)
    with torch.inference_mode():  # a mask first built under inference_mode must not break training later
        a(images)
    a.train()
    sum(a(images, targets).values()).backward()
    with pytest.raises(ValueError, match="packed=True needs head towers without normalisation"):
        create_model("retinanet_resnet18_fpn_moe", head_norm="gn", packed=True, **SMALL)
    with pytest.raises(ValueError, match="stacked/capacity_factor"):
        create_model("retinanet_resnet18_fpn_moe", packed=True, capacity_factor=1.25, **SMALL)
    gn = create_model("retinanet_resnet18_fpn_moe", head_norm="gn", **SMALL)
    assert not gn.head.classification_head.packed and not gn.head.regression_head.packed
    # packed heads run every expert each step: data-parallel training needs no search for unused parameters
    assert not a.head.classification_head.moe.skips_idle_experts
    assert b.head.classification_head.moe.skips_idle_experts and gn.head.regression_head.moe.skips_idle_experts
    a.head.classification_head.moe.set_controls(disabled=[0])
    assert a.head.classification_head.moe.skips_idle_experts
