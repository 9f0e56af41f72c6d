"""RetinaNet with mixture-of-experts heads, built on torchvision's detector (SPEC §2 "RetinaNet on COCO").

The classification and/or regression head becomes an :class:`moecnn.MoE` of full-head experts (each expert
is a whole torchvision head tower: 4 × Conv3×3-(GN)-ReLU + the final conv), with one gate per head shared
by all FPN levels. The head calls its MoE once per level, so routing is per image per FPN level (the
paper's, ``routing="level"``, gate ReLU → GAP → Linear(256→N)) or, beyond the paper, per anchor position
(``routing="anchor"``: a spatial gate routes each feature-map cell, so experts can specialise on object
size within one level). torchvision's losses, anchor matching and post-processing are reused; the heads'
auxiliary balancing losses are added to torchvision's loss dict as ``"aux"`` in training.

Per-level routing of the last forward is kept in ``model.head.level_records`` (``{"cls": [...], "reg":
[...]}``, one :class:`moecnn.RoutingRecord` per FPN level); detections returned in eval mode carry the
FPN ``levels`` they come from and the top-1 ``experts`` that produced them.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from pathlib import Path
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.ops import FrozenBatchNorm2d, boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation

from ..layers.grouped import channels_last
from ..layers.moe import MoE, RoutingRecord
from ..registry import DETECTORS

__all__ = [
    "HeadTower",
    "MoEClassificationHead",
    "MoERegressionHead",
    "MoERetinaNetHead",
    "MoERetinaNet",
    "build_retinanet",
    "retinanet_resnet18_fpn_moe",
    "retinanet_resnet50_fpn_moe",
    "retinanet_resnet18_fpn",
    "retinanet_resnet50_fpn",
    "FPN_LEVEL_NAMES",
]

FPN_LEVEL_NAMES = ("P3", "P4", "P5", "P6", "P7")
DEFAULT_ANCHOR_SIZES = (32, 64, 128, 256, 512)


# ---------------------------------------------------------------------------------------------------------
# Experts and MoE heads
# ---------------------------------------------------------------------------------------------------------


class HeadTower(nn.Module):
    """One full-head expert: 4 × Conv3×3-(norm)-ReLU then a Conv3×3 to ``num_anchors × out_per_anchor``.

    ``flatten=True`` returns torchvision's per-level layout (B, H·W·A, out_per_anchor); ``flatten=False``
    keeps the map (B, A·out, H, W) (needed for per-anchor routing, where experts are mixed per pixel).
    Initialised like torchvision's RetinaNet heads (normal std 0.01; ``bias_init`` for the last conv).
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        out_per_anchor: int,
        bias_init: float = 0.0,
        norm_layer=None,
        flatten: bool = True,
        num_convs: int = 4,
    ) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *[Conv2dNormActivation(in_channels, in_channels, norm_layer=norm_layer) for _ in range(num_convs)]
        )
        self.out = nn.Conv2d(in_channels, num_anchors * out_per_anchor, kernel_size=3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
        nn.init.constant_(self.out.bias, bias_init)
        self.num_anchors = num_anchors
        self.out_per_anchor = out_per_anchor
        self.flatten = flatten
        self.packable = norm_layer is None  # 3×3 convs and ReLUs only: exact on packed levels (see pack_levels)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``mask`` (1×1×H×W, 1 on the packed levels' cells, 0 between them): each hidden layer's output is
        multiplied by it, so every level sees zeros around it as with its own zero padding."""
        if mask is None:
            y = self.conv(x)
        else:
            y = x
            for block in self.conv:
                y = block(y)
                y = y * mask.to(y.dtype)
        y = self.out(y)
        return _to_anchor_layout(y, self.out_per_anchor) if self.flatten else y


def check_packed(packed: Optional[bool], packable: bool, execution_set: bool) -> None:
    """One-line refusals of ``packed=True`` where it cannot apply (also used when a config is validated)."""
    if packed and not packable:
        raise ValueError("packed=True needs head towers without normalisation layers (head_norm='none'): a "
                         "group norm over the packed map would mix the FPN levels; use packed=null or false")
    if packed and execution_set:
        raise ValueError("packed=True runs every expert on the packed map, so stacked/capacity_factor (per-level "
                         "execution) would be ignored; unset them or set packed=false")


def pack_layout(sizes: Sequence[Sequence[int]]) -> tuple:
    """Where FPN levels of sizes [(h, w), ...] go in one map: the first at the top left, the others stacked
    top to bottom in a column to its right, one zero row or column between any two.

    Returns (H, W, [(top, left), ...]). A 3×3 convolution with zero padding 1, stride 1 computes on every
    level's cells of the packed map exactly what it computes on the level alone, as long as the cells between
    levels are zero — which :class:`HeadTower` restores after every layer with the mask of
    :func:`pack_mask`."""
    (h0, w0), rest = sizes[0], list(sizes[1:])
    pos = [(0, 0)]
    top = 0
    left = w0 + 1
    for h, _ in rest:
        pos.append((top, left))
        top += h + 1
    height = max(h0, top - 1 if rest else h0)
    width = w0 + (1 + max(w for _, w in rest) if rest else 0)
    return height, width, pos


def pack_mask(sizes: Sequence[Sequence[int]], layout: tuple, device, dtype=torch.float32) -> Tensor:
    """1×1×H×W: 1 on the levels' cells of :func:`pack_layout`, 0 elsewhere."""
    return pack_levels([torch.ones(1, 1, h, w, device=device, dtype=dtype) for h, w in sizes], layout)


def pack_levels(xs: Sequence[Tensor], layout: tuple) -> Tensor:
    """B×C×H×W map holding every level of ``xs`` at its place in ``layout`` (zeros elsewhere)."""
    height, width, pos = layout
    x0 = xs[0]
    fmt = torch.channels_last if channels_last(x0) else torch.contiguous_format
    canvas = torch.zeros((x0.shape[0], x0.shape[1], height, width), dtype=x0.dtype, device=x0.device) \
        .contiguous(memory_format=fmt)
    for x, (t, l) in zip(xs, pos):
        canvas[:, :, t:t + x.shape[-2], l:l + x.shape[-1]] = x
    return canvas


def _to_anchor_layout(y: Tensor, per_anchor: int) -> Tensor:
    """(B, A·K, H, W) → (B, H·W·A, K), torchvision's ordering."""
    b, _, h, w = y.shape
    return y.view(b, -1, per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, per_anchor)


class _FP32Gate(nn.Module):
    """Runs a gate outside autocast in float32: routing decisions stay exact under bf16 training and the
    MoE's top-k/scatter see one dtype (the experts still run in bf16)."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.gate(x.float()).float()


class _MoEHeadMixin:
    """Shared forward of the MoE heads: one MoE call per FPN level, records collected per forward."""

    moe: MoE
    routing_mode: str
    per_anchor: int

    def _init_moe(self, tower_kwargs: dict, num_experts: int, k: int, routing_mode: str, gate, moe_kwargs: dict,
                  packed: Optional[bool] = None):
        if routing_mode not in ("level", "anchor"):
            raise ValueError(f"routing must be 'level' or 'anchor', got '{routing_mode}'")
        # stacked experts must keep the channel layout: the anchor layout is then applied after the mixture
        # (a per-image linear reshuffle, so Σ g_i L(E_i(x)) = L(Σ g_i E_i(x)))
        # (whatever execution the layer picks, so the experts always keep the channel layout)
        flatten = False
        self._layout_after = True
        experts = [HeadTower(flatten=flatten, **tower_kwargs) for _ in range(num_experts)]
        self.moe = MoE(experts, gate=gate, k=k, in_channels=tower_kwargs["in_channels"], **moe_kwargs)
        self.moe.gate = _FP32Gate(self.moe.gate)
        # the gate decides per-image vs per-position routing: check it matches the requested mode
        with torch.no_grad():
            probe = self.moe.gate(torch.zeros(1, tower_kwargs["in_channels"], 4, 4))
        if routing_mode == "anchor" and probe.dim() != 4:
            raise ValueError(
                f"routing='anchor' needs a spatial gate returning B×N×H×W logits (e.g. gate='spatial'); "
                f"gate {gate!r} returns per-image logits"
            )
        if routing_mode == "level" and probe.dim() != 2:
            raise ValueError(f"routing='level' needs a per-image gate; gate {gate!r} returns per-pixel logits")
        self.routing_mode = routing_mode
        self.per_anchor = tower_kwargs["out_per_anchor"]
        self.level_records: List[RoutingRecord] = []
        packable = experts[0].packable
        forced = moe_kwargs.get("stacked") is not None or moe_kwargs.get("capacity_factor") is not None
        check_packed(packed, packable, forced)
        self._masks: Dict[tuple, Tensor] = {}
        self.packed = (packable and not forced) if packed is None else bool(packed)

    @property
    def packed(self) -> bool:
        """Each expert runs once on all FPN levels packed into one map (else one MoE call per level)."""
        return self._packed

    @packed.setter
    def packed(self, value: bool) -> None:
        self._packed = bool(value)
        self.moe.runs_every_expert = self._packed  # every expert gets a gradient each step (DDP: no unused search)

    def _moe_forward(self, x: Sequence[Tensor]) -> Tensor:
        if self.packed:
            return self._packed_forward(x)
        outs, records = [], []
        for features in x:
            y = self.moe(features)
            if self._layout_after:
                y = _to_anchor_layout(y, self.per_anchor)
            outs.append(y)
            records.append(self.moe.record)
        self.level_records = records
        return torch.cat(outs, dim=1)

    def _packed_forward(self, x: Sequence[Tensor]) -> Tensor:
        """Route every level (per-level records, as the per-level path), then run each expert once on all
        levels packed into one map (:func:`pack_levels`) and mix each level's outputs with its gate weights:
        the function of the per-level path, with the kernel launches of one tower call per expert instead of
        one per expert and level. Every enabled expert runs on every image (a weight of 0 where it is not
        chosen): as with stacked or capacity execution of an MoE layer, an expert that no unit chose in a step
        gets a zero gradient rather than none (an optimiser's weight decay and momentum then still move it), and
        all experts' activations are kept for the backward pass (N/k times the per-level path's)."""
        moe = self.moe
        weights, records = [], []
        for features in x:
            weights.append(moe.route(features))
            records.append(moe.record)
        self.level_records = records
        sizes = [tuple(f.shape[-2:]) for f in x]
        layout = pack_layout(sizes)
        dev = x[0].device
        # the mask in the towers' compute dtype (autocast's, else the features'), cached per level sizes
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x[0].dtype
        key = (tuple(sizes), dev, dtype)
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) >= 64:  # image sizes vary (e.g. COCO aspect ratios): keep a bounded cache
                self._masks.clear()
            with torch.inference_mode(False):  # a normal tensor even when built under inference_mode: training
                mask = self._masks[key] = pack_mask(sizes, layout, dev, dtype)  # may reuse it
        canvas = pack_levels(x, layout)
        if moe.forced_expert is not None:
            run = [moe.forced_expert]
        else:
            run = [e for e in range(moe.num_experts) if e not in moe.disabled]
        outs = torch.stack([moe.experts[e](canvas, mask) for e in run])  # E×B×(A·K)×H×W
        ys = []
        for f, wt, (t, l) in zip(x, weights, layout[2]):
            region = outs[..., t:t + f.shape[-2], l:l + f.shape[-1]]
            if len(run) < moe.num_experts:
                wt = wt[:, run]
            wt = wt.movedim(1, 0).to(outs.dtype)  # E×B (per level) or E×B×h×w (per anchor)
            wt = wt[:, :, None, None, None] if wt.dim() == 2 else wt.unsqueeze(2)
            ys.append(_to_anchor_layout((region * wt).sum(0), self.per_anchor))
        return torch.cat(ys, dim=1)

    def aux_loss(self) -> Tensor:
        """Mean over FPN levels of each level's weighted balancing losses (0 when there are none)."""
        terms = [r.aux_total for r in self.level_records if r is not None and r.aux_losses]
        if not terms:
            p = next(self.moe.parameters())
            return p.new_zeros(())
        return torch.stack(terms).mean()


class MoEClassificationHead(_MoEHeadMixin, RetinaNetClassificationHead):
    """torchvision's classification head (and its focal loss) with an MoE of full-head experts."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_experts: int = 4,
        k: int = 2,
        routing: str = "level",
        gate="relu_gap_fc",
        prior_probability: float = 0.01,
        norm_layer=None,
        num_convs: int = 4,
        packed: Optional[bool] = None,
        **moe_kwargs,
    ) -> None:
        nn.Module.__init__(self)
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        from torchvision.models.detection import _utils as det_utils

        self.BETWEEN_THRESHOLDS = det_utils.Matcher.BETWEEN_THRESHOLDS
        tower = dict(
            in_channels=in_channels,
            num_anchors=num_anchors,
            out_per_anchor=num_classes,
            bias_init=-math.log((1 - prior_probability) / prior_probability),
            norm_layer=norm_layer,
            num_convs=num_convs,
        )
        self._init_moe(tower, num_experts, k, routing, gate, moe_kwargs, packed)

    def forward(self, x):  # type: ignore[override]
        return self._moe_forward(x)


class MoERegressionHead(_MoEHeadMixin, RetinaNetRegressionHead):
    """torchvision's regression head (and its box loss) with an MoE of full-head experts."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_experts: int = 4,
        k: int = 2,
        routing: str = "level",
        gate="relu_gap_fc",
        norm_layer=None,
        num_convs: int = 4,
        packed: Optional[bool] = None,
        **moe_kwargs,
    ) -> None:
        nn.Module.__init__(self)
        from torchvision.models.detection import _utils as det_utils

        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self._loss_type = "l1"
        tower = dict(
            in_channels=in_channels, num_anchors=num_anchors, out_per_anchor=4, norm_layer=norm_layer, num_convs=num_convs
        )
        self._init_moe(tower, num_experts, k, routing, gate, moe_kwargs, packed)

    def forward(self, x):  # type: ignore[override]
        return self._moe_forward(x)


class MoERetinaNetHead(RetinaNetHead):
    """RetinaNetHead whose classification and/or regression head is an MoE (``moe_heads``)."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        moe_heads: str = "both",
        num_experts: int = 4,
        k: int = 2,
        routing: str = "level",
        gate="relu_gap_fc",
        norm_layer=None,
        num_convs: int = 4,
        packed: Optional[bool] = None,
        **moe_kwargs,
    ) -> None:
        nn.Module.__init__(self)
        if moe_heads not in ("both", "cls", "reg", "none"):
            raise ValueError(f"moe_heads must be 'both', 'cls', 'reg' or 'none', got '{moe_heads}'")
        kw = dict(
            num_experts=num_experts, k=k, routing=routing, gate=gate, norm_layer=norm_layer, num_convs=num_convs,
            packed=packed, **moe_kwargs,
        )
        if moe_heads in ("both", "cls"):
            self.classification_head = MoEClassificationHead(in_channels, num_anchors, num_classes, **kw)
        else:
            self.classification_head = RetinaNetClassificationHead(
                in_channels, num_anchors, num_classes, norm_layer=norm_layer
            )
        if moe_heads in ("both", "reg"):
            self.regression_head = MoERegressionHead(in_channels, num_anchors, **kw)
        else:
            self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors, norm_layer=norm_layer)
        self.moe_heads = moe_heads
        self.routing_mode = routing

    def forward(self, x):
        # float32 outputs: box decoding and the losses stay exact under bf16 autocast
        return {"cls_logits": self.classification_head(x).float(), "bbox_regression": self.regression_head(x).float()}

    @property
    def level_records(self) -> Dict[str, List[RoutingRecord]]:
        """Routing of the last forward: ``{"cls": [rec_P3, ...], "reg": [...]}`` for each MoE head."""
        out = {}
        for key, h in (("cls", self.classification_head), ("reg", self.regression_head)):
            if isinstance(h, _MoEHeadMixin):
                out[key] = list(h.level_records)
        return out

    def moe_head_names(self) -> List[str]:
        return list(self.level_records.keys()) or [
            key
            for key, h in (("cls", self.classification_head), ("reg", self.regression_head))
            if isinstance(h, _MoEHeadMixin)
        ]

    def aux_loss(self) -> Tensor:
        terms = [h.aux_loss() for h in (self.classification_head, self.regression_head) if isinstance(h, _MoEHeadMixin)]
        if not terms:
            return next(self.parameters()).new_zeros(())
        return torch.stack(terms).sum()


# ---------------------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------------------


class MoERetinaNet(RetinaNet):
    """torchvision RetinaNet that adds the MoE heads' ``"aux"`` loss and expert attribution of detections.

    Training: the loss dict has ``classification``, ``bbox_regression`` and (with MoE heads) ``aux``.
    Eval: each detection dict also has ``levels`` (FPN level index, 0 = P3) and, with MoE heads,
    ``experts`` (top-1 expert of the attribution head at the detection's level / anchor position).
    """

    def __init__(self, backbone, num_classes: int, attribution_head: str = "auto", **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.attribution_head = attribution_head

    # ---- training
    def compute_loss(self, targets, head_outputs, anchors):
        losses = super().compute_loss(targets, head_outputs, anchors)
        if isinstance(self.head, MoERetinaNetHead) and self.head.moe_heads != "none":
            losses["aux"] = self.head.aux_loss()
        return losses

    # ---- attribution helpers
    def _attr_key(self) -> Optional[str]:
        if not isinstance(self.head, MoERetinaNetHead):
            return None
        names = self.head.moe_head_names()
        if not names:
            return None
        if self.attribution_head in names:
            return self.attribution_head
        return names[0]

    def expert_at(self, image: int, level: int, position: Tensor) -> Tensor:
        """Top-1 expert of the attribution head for anchors ``position`` (indices within the level)."""
        key = self._attr_key()
        if key is None:
            return torch.full_like(position, -1)
        rec = self.head.level_records[key][level]
        if rec.weights.dim() == 2:  # per-image routing
            return rec.weights[image].argmax().expand_as(position).clone()
        w = rec.weights[image]  # N×H×W
        a = self.anchor_generator.num_anchors_per_location()[0]
        cell = torch.div(position, a, rounding_mode="floor")
        return w.flatten(1).argmax(0)[cell]

    def gate_weights_at(self, key: str, image: int, level: int, position: Tensor) -> Tensor:
        """Sparse gate weights (len(position)×N) of MoE head ``key`` at anchors ``position`` of a level."""
        rec = self.head.level_records[key][level]
        if rec.weights.dim() == 2:
            return rec.weights[image].unsqueeze(0).expand(position.numel(), -1)
        a = self.anchor_generator.num_anchors_per_location()[0]
        cell = torch.div(position, a, rounding_mode="floor")
        return rec.weights[image].flatten(1).t()[cell]

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        """torchvision's post-processing (score threshold, top-k per level, decode, clip, NMS) keeping the
        level, the anchor index and the producing expert of each detection."""
        detections = []
        for b, image_shape in enumerate(image_shapes):
            boxes_l, scores_l, labels_l, levels_l, experts_l = [], [], [], [], []
            for lvl, (reg, logits, anc) in enumerate(
                zip(head_outputs["bbox_regression"], head_outputs["cls_logits"], anchors[b])
            ):
                reg, logits = reg[b], logits[b]
                c = logits.shape[-1]
                scores = torch.sigmoid(logits).flatten()
                cand = torch.nonzero(scores > self.score_thresh).flatten()
                scores = scores[cand]
                if cand.numel() > self.topk_candidates:
                    scores, order = scores.topk(self.topk_candidates)
                    cand = cand[order]
                anchor_idx = torch.div(cand, c, rounding_mode="floor")
                boxes = self.box_coder.decode_single(reg[anchor_idx], anc[anchor_idx])
                boxes_l.append(box_ops.clip_boxes_to_image(boxes, image_shape))
                scores_l.append(scores)
                labels_l.append(cand % c)
                levels_l.append(torch.full_like(anchor_idx, lvl))
                experts_l.append(self.expert_at(b, lvl, anchor_idx))
            boxes, scores, labels = torch.cat(boxes_l), torch.cat(scores_l), torch.cat(labels_l)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            det = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
            det["levels"] = torch.cat(levels_l)[keep]
            if self._attr_key() is not None:
                det["experts"] = torch.cat(experts_l)[keep]
            detections.append(det)
        return detections

    # ---- analysis pass
    @torch.no_grad()
    def analyze(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        """Eval-mode forward that also attributes ground-truth boxes to FPN levels and experts.

        Returns ``(detections, gt_info)``: detections as in eval mode (original image coordinates, with
        ``levels``/``experts``); ``gt_info`` one dict per image with, for each GT box, ``levels`` (FPN level
        of the best-matching anchor, i.e. the anchor with the highest IoU), ``positions`` (its anchor index
        within the level) and, for each MoE head ``key``, ``weights_<key>`` (#GT × N sparse gate weights at
        that anchor). ``level_weights`` maps each head to per-level image routing (L tensors of B×N, the
        mean over positions for per-anchor routing).
        """
        was = self.training
        self.eval()
        try:
            original_sizes = [tuple(img.shape[-2:]) for img in images]
            tgts = None
            if targets is not None:
                tgts = [{"boxes": t["boxes"].clone(), "labels": t["labels"].clone()} for t in targets]
            image_list, tgts = self.transform(images, tgts)
            feats = self.backbone(image_list.tensors)
            if isinstance(feats, Tensor):
                feats = OrderedDict([("0", feats)])
            feats = list(feats.values())
            head_outputs = self.head(feats)
            anchors = self.anchor_generator(image_list, feats)
            per_level = [f.shape[-2] * f.shape[-1] for f in feats]
            a = head_outputs["cls_logits"].shape[1] // sum(per_level)
            split = [n * a for n in per_level]
            split_out = {k: list(v.split(split, dim=1)) for k, v in head_outputs.items()}
            split_anchors = [list(anc.split(split)) for anc in anchors]
            dets = self.postprocess_detections(split_out, split_anchors, image_list.image_sizes)
            dets = self.transform.postprocess(dets, image_list.image_sizes, original_sizes)

            records = self.head.level_records if isinstance(self.head, MoERetinaNetHead) else {}
            level_weights = {
                key: [r.weights if r.weights.dim() == 2 else r.weights.mean(dim=(2, 3)) for r in recs]
                for key, recs in records.items()
            }
            gt_info = []
            if tgts is not None:
                starts = torch.tensor([0] + split).cumsum(0)
                for b, t in enumerate(tgts):
                    boxes = t["boxes"]
                    info: Dict[str, Tensor] = {}
                    if boxes.numel() == 0:
                        info["levels"] = torch.zeros(0, dtype=torch.long)
                        info["positions"] = torch.zeros(0, dtype=torch.long)
                        for key in records:
                            info[f"weights_{key}"] = torch.zeros(0, records[key][0].weights.shape[1])
                        gt_info.append(info)
                        continue
                    iou = box_ops.box_iou(boxes, anchors[b])  # G × A_total
                    best = iou.argmax(dim=1)
                    levels = torch.bucketize(best, starts[1:].to(best.device), right=True)
                    positions = best - starts.to(best.device)[levels]
                    info["levels"] = levels.cpu()
                    info["positions"] = positions.cpu()
                    for key in records:
                        rows = [self.gate_weights_at(key, b, int(l), p.view(1)) for l, p in zip(levels, positions)]
                        info[f"weights_{key}"] = torch.cat(rows).float().cpu()
                    gt_info.append(info)
            return dets, {"gt": gt_info, "level_weights": level_weights}
        finally:
            self.train(was)


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------


def _read_state_dict(path: str) -> Dict[str, Tensor]:
    from ..safeio import read_state_dict

    return read_state_dict(path, what="detector weights")


def _torchvision_state_dict(arch: str, what: str) -> Dict[str, Tensor]:
    """torchvision's published weights (needs the internet or a filled torch hub cache)."""
    from torchvision.models import ResNet18_Weights, ResNet50_Weights
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

    if what == "detector":
        if arch != "resnet50":
            raise ValueError("torchvision publishes COCO RetinaNet weights only for resnet50 (weights='torchvision')")
        return RetinaNet_ResNet50_FPN_Weights.COCO_V1.get_state_dict(progress=True)
    w = ResNet50_Weights.IMAGENET1K_V1 if arch == "resnet50" else ResNet18_Weights.IMAGENET1K_V1
    return w.get_state_dict(progress=True)


def _expand_head_to_experts(sd: Dict[str, Tensor], model: MoERetinaNet, noise: float, seed: int) -> Dict[str, Tensor]:
    """Map a dense torchvision head (``head.classification_head.conv.0.0.weight`` …) onto every expert."""
    out = dict(sd)
    gen = torch.Generator().manual_seed(seed)
    for key, last in (("classification_head", "cls_logits"), ("regression_head", "bbox_reg")):
        head = getattr(model.head, key)
        prefix = f"head.{key}."
        dense = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and ".moe." not in k}
        if not isinstance(head, _MoEHeadMixin) or not dense:
            continue
        for k in dense:
            out.pop(prefix + k)
        for e in range(head.moe.num_experts):  # per-expert keys whatever the execution (stacked or not)
            for k, v in dense.items():
                new = k.replace(f"{last}.", "out.", 1) if k.startswith(last + ".") else k
                v = v.clone()
                if noise > 0 and v.is_floating_point() and v.numel() > 1:
                    v = v + torch.randn(v.shape, generator=gen).to(v) * (v.float().std().item() or 1.0) * noise
                out[f"{prefix}moe.experts.{e}.{new}"] = v
    return out


def uses_torchvision_coco_weights(weights: Optional[str]) -> bool:
    """torchvision's COCO RetinaNet weights (by name or as the downloaded file) were trained with
    FrozenBatchNorm eps = 0; torchvision sets it when loading them, and so do we."""
    if weights is None:
        return False
    return weights in ("torchvision", "DEFAULT") or Path(str(weights)).name.startswith("retinanet_resnet50_fpn_coco")


def load_detector_weights(
    model: MoERetinaNet, weights: str, arch: str, expert_noise: float = 0.01, seed: int = 0
) -> Dict[str, List[str]]:
    """Load a local weights file (or ``"torchvision"``) into a (MoE) RetinaNet; returns what was skipped.

    Accepted: a torchvision/dense RetinaNet state dict (its head is copied into every expert, plus Gaussian
    noise of ``expert_noise`` × each tensor's std so experts can diverge), an moecnn MoE RetinaNet
    checkpoint, or an ImageNet ResNet state dict (loaded into the backbone only). Tensors whose shapes do
    not fit (e.g. a different number of classes) are skipped with a warning.
    """
    if weights in ("torchvision", "DEFAULT"):
        sd = _torchvision_state_dict(arch, "detector")
    elif weights in ("torchvision_backbone", "imagenet"):
        sd = _torchvision_state_dict(arch, "backbone")
    else:
        sd = _read_state_dict(weights)
    if not any(k.startswith("backbone.") or k.startswith("head.") for k in sd):
        if "conv1.weight" not in sd:
            raise ValueError(f"{weights}: neither a RetinaNet state dict nor a ResNet one (no 'conv1.weight')")
        sd = {f"backbone.body.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    # torchvision v1 head layout (conv.0/conv.2 …) → v2 (conv.0.0 …)
    for key in list(sd):
        for head in ("classification_head", "regression_head"):
            p = f"head.{head}.conv."
            if key.startswith(p) and key[len(p):].split(".")[1] in ("weight", "bias"):
                i, t = key[len(p):].split(".")
                sd[f"{p}{int(i) // 2}.0.{t}"] = sd.pop(key)
    sd = _expand_head_to_experts(sd, model, expert_noise, seed)
    own = model.state_dict()
    skipped = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    for k in skipped:
        sd.pop(k)
    result = model.load_state_dict(sd, strict=False)
    if skipped:
        warnings.warn(f"weights {weights}: skipped {len(skipped)} tensors of another shape: {', '.join(skipped[:6])}")
    missing_backbone = [k for k in result.missing_keys if k.startswith("backbone.body.")]
    if missing_backbone:
        warnings.warn(f"weights {weights}: {len(missing_backbone)} backbone tensors missing, e.g. {missing_backbone[0]}")
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "skipped": skipped}


# ---------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------


def _parse_balance(balance, balance_weight: float):
    if isinstance(balance, str) and ("," in balance or ":" in balance or balance in ("", "none")):
        from .config import parse_balance

        return parse_balance(balance, balance_weight)
    if isinstance(balance, Mapping):
        return {str(k): float(v) for k, v in balance.items()}
    if balance is not None and not isinstance(balance, str):
        return list(balance)
    return balance


def build_retinanet(
    arch: str = "resnet50",
    *,
    num_classes: int = 91,
    num_experts: int = 4,
    k: int = 2,
    moe_heads: str = "both",
    routing: str = "level",
    gate: Optional[str] = None,
    balance: Any = "kl",
    balance_weight: float = 0.25,
    threshold: Optional[float] = None,
    decay: Optional[float] = None,
    noisy: Optional[bool] = None,
    capacity_factor: Optional[float] = None,
    weights: Optional[str] = None,
    weights_backbone: Optional[str] = None,
    freeze_backbone: bool = False,
    frozen_bn: Optional[bool] = None,
    torchvision_bn_eps: bool = False,
    trainable_backbone_layers: Optional[int] = None,
    min_size: int = 608,
    max_size: int = 1024,
    anchor_sizes: Optional[Sequence[int]] = None,
    head_norm: str = "none",
    fpn_channels: int = 256,
    head_convs: int = 4,
    stacked: Optional[bool] = None,
    packed: Optional[bool] = None,
    expert_noise: float = 0.01,
    attribution_head: str = "auto",
    score_thresh: float = 0.05,
    detections_per_img: int = 300,
    seed: int = 0,
    **retinanet_kwargs,
) -> MoERetinaNet:
    """RetinaNet-FPN (P3–P7, 256 channels, 9 anchors, focal loss) with MoE heads.

    Args:
        arch: ``resnet50`` or ``resnet18`` backbone.
        num_classes: classes including background (torchvision convention; COCO ids → 91).
        num_experts, k: experts per MoE head and active experts per routed unit.
        moe_heads: ``both``, ``cls``, ``reg`` or ``none`` (dense torchvision heads).
        routing: ``level`` (per image per FPN level, the paper's) or ``anchor`` (per anchor position).
        gate: gate name; default ``relu_gap_fc`` (level) / ``spatial`` (anchor).
        balance, balance_weight, threshold, noisy: balancing as in :class:`moecnn.MoE` (``"kl"``,
            ``"relative"``, ``"kl:0.25,z_loss:0.001"``, a dict, or None). Aux losses are averaged over levels.
        weights: local weights file (dense/MoE RetinaNet or ImageNet ResNet), or ``"torchvision"``
            (COCO RetinaNet R50, needs the internet). Dense head weights are copied into every expert.
        weights_backbone: local ImageNet ResNet file or ``"torchvision"`` for the backbone only.
        freeze_backbone: freeze backbone + FPN (BatchNorm frozen too), train the heads — the paper's setup.
        frozen_bn: FrozenBatchNorm2d in the backbone (default: when pretrained weights or freeze_backbone).
        torchvision_bn_eps: FrozenBatchNorm eps = 0 as torchvision's COCO weights need (automatic when
            ``weights`` names them; set it when rebuilding such a model to load a checkpoint).
        trainable_backbone_layers: when not frozen, how many ResNet stages train (0–5, default 5).
        min_size, max_size: resize (short side, long-side cap); the paper: 608 / 1024.
        anchor_sizes: base anchor size per level (default 32, 64, 128, 256, 512).
        head_norm: ``none`` (torchvision v1 heads) or ``gn`` (GroupNorm(32) in the towers).
        fpn_channels, head_convs: FPN width (256) and convs per head tower (4); smaller values only for
            quick tests (dense heads then keep torchvision's 4 convs).
        stacked: run each MoE head's experts as one channel-stacked grouped network (see
            :class:`moecnn.layers.StackedExperts`): the kernel launches of one head per FPN level (per-level
            execution only).
        packed: run each expert once on all FPN levels packed into one map (:func:`pack_levels`) instead of
            once per level (the same function, far fewer kernel launches; every expert then runs on every
            image). ``None`` (default): packed whenever the towers have no normalisation (``head_norm='none'``)
            and neither ``stacked`` nor ``capacity_factor`` is set; else per level with the MoE layer's
            execution.
    """
    if arch not in ("resnet50", "resnet18"):
        raise ValueError(f"arch must be 'resnet50' or 'resnet18', got '{arch}'")
    pretrained = weights is not None or weights_backbone is not None
    if frozen_bn is None:
        frozen_bn = pretrained or freeze_backbone
    norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    body = (resnet50 if arch == "resnet50" else resnet18)(weights=None, norm_layer=norm_layer)
    if freeze_backbone:
        trainable = 0
    else:
        trainable = 5 if trainable_backbone_layers is None else int(trainable_backbone_layers)
    if not 0 <= trainable <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable}")
    train_prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
    for name, p in body.named_parameters():
        if not any(name.startswith(t) for t in train_prefixes):
            p.requires_grad_(False)
    c2 = body.inplanes // 8  # 64 (BasicBlock) or 256 (Bottleneck)
    backbone = BackboneWithFPN(
        body,
        {"layer2": "0", "layer3": "1", "layer4": "2"},
        [c2 * 2, c2 * 4, c2 * 8],
        fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )
    sizes = tuple(anchor_sizes) if anchor_sizes is not None else DEFAULT_ANCHOR_SIZES
    if len(sizes) != 5:
        raise ValueError(f"anchor_sizes needs one base size per FPN level P3–P7 (5), got {list(sizes)}")
    anchor_gen = AnchorGenerator(
        tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes), ((0.5, 1.0, 2.0),) * 5
    )
    num_anchors = anchor_gen.num_anchors_per_location()[0]
    if head_norm not in ("none", "gn"):
        raise ValueError(f"head_norm must be 'none' or 'gn', got '{head_norm}'")
    head_norm_layer = partial(nn.GroupNorm, 32) if head_norm == "gn" else None
    if gate is None:
        gate = "spatial" if routing == "anchor" else "relu_gap_fc"
    moe_kwargs = dict(balance=_parse_balance(balance, balance_weight), balance_weight=balance_weight)
    for key, val in (("stacked", stacked), ("threshold", threshold), ("decay", decay), ("noisy", noisy),
                     ("capacity_factor", capacity_factor)):
        if val is not None:
            moe_kwargs[key] = val
    head = MoERetinaNetHead(
        backbone.out_channels,
        num_anchors,
        num_classes,
        moe_heads=moe_heads,
        num_experts=num_experts,
        k=k,
        routing=routing,
        gate=gate,
        norm_layer=head_norm_layer,
        num_convs=head_convs,
        packed=packed,
        **(moe_kwargs if moe_heads != "none" else {}),
    )
    model = MoERetinaNet(
        backbone,
        num_classes,
        attribution_head=attribution_head,
        min_size=min_size,
        max_size=max_size,
        anchor_generator=anchor_gen,
        head=head,
        score_thresh=score_thresh,
        detections_per_img=detections_per_img,
        **retinanet_kwargs,
    )
    if weights_backbone is not None:
        load_detector_weights(model, "torchvision_backbone" if weights_backbone == "torchvision" else weights_backbone, arch)
    if weights is not None:
        load_detector_weights(model, weights, arch, expert_noise=expert_noise, seed=seed)
    if torchvision_bn_eps or uses_torchvision_coco_weights(weights):
        from torchvision.models.detection._utils import overwrite_eps

        overwrite_eps(model, 0.0)
    if freeze_backbone:
        for p in model.backbone.parameters():  # body and FPN
            p.requires_grad_(False)
    model.config = dict(  # type: ignore[attr-defined]
        arch=arch, num_classes=num_classes, num_experts=num_experts, k=k, moe_heads=moe_heads, routing=routing,
        gate=gate if isinstance(gate, str) else type(gate).__name__,
    )
    return model


def retinanet_resnet50_fpn_moe(**kwargs) -> MoERetinaNet:
    """RetinaNet ResNet-50-FPN with MoE heads (defaults: both heads, N=4, k=2, relu_gap_fc, KL 0.25)."""
    return build_retinanet("resnet50", **kwargs)


def retinanet_resnet18_fpn_moe(**kwargs) -> MoERetinaNet:
    """RetinaNet ResNet-18-FPN with MoE heads (a lighter model for quick work)."""
    return build_retinanet("resnet18", **kwargs)


def retinanet_resnet50_fpn(**kwargs) -> MoERetinaNet:
    """Dense RetinaNet ResNet-50-FPN (torchvision heads), the baseline."""
    kwargs["moe_heads"] = "none"
    return build_retinanet("resnet50", **kwargs)


def retinanet_resnet18_fpn(**kwargs) -> MoERetinaNet:
    """Dense RetinaNet ResNet-18-FPN (torchvision heads)."""
    kwargs["moe_heads"] = "none"
    return build_retinanet("resnet18", **kwargs)


for _name, _fn in (
    ("retinanet_resnet50_fpn_moe", retinanet_resnet50_fpn_moe),
    ("retinanet_resnet18_fpn_moe", retinanet_resnet18_fpn_moe),
    ("retinanet_resnet50_fpn", retinanet_resnet50_fpn),
    ("retinanet_resnet18_fpn", retinanet_resnet18_fpn),
):
    if _name not in DETECTORS:
        DETECTORS.register(_name)(_fn)
