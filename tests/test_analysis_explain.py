"""Explain the experts (issue 15) on planted structure: gate attribution, expert contribution, attribute and concept
tests with Benjamini-Hochberg, routing dynamics, layer-to-layer flow. CPU, tiny hand-built models."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _analysis_fixtures import (CLASS_NAMES, CLASS_TO_SUPER, FEAT_REGION, IMAGE_REGION, SUPER_NAMES,  # noqa: E402
                                BrightGate, RedBlueGate, TinyMoENet, colour_texture_images, planted_routing,
                                probe_routing_arrays, region_images)

from moecnn.analysis import analyze, attribution, explain, stats  # noqa: E402
from moecnn.analysis.attributes import image_attributes  # noqa: E402
from moecnn.analysis.compute import _norm_input  # noqa: E402
from moecnn.analysis.dynamics import routing_dynamics  # noqa: E402
from moecnn.analysis.flow import layer_flow  # noqa: E402
from moecnn.analysis.rundir import read_concepts, read_probe_routing  # noqa: E402

NAMES = dict(class_names=CLASS_NAMES, superclass_names=SUPER_NAMES, class_to_super=CLASS_TO_SUPER)


def _inside(maps: np.ndarray, region) -> np.ndarray:
    """Share of the positive mass of K×H×W maps inside the image region ((r0, r1), (c0, c1))."""
    (r0, r1), (c0, c1) = region
    pos = np.clip(maps, 0, None)
    return pos[:, r0:r1, c0:c1].sum((1, 2)) / pos.sum((1, 2))


# ------------------------------------------------------------------------------------------ gate attribution
def test_region_gate_attribution_lies_in_the_planted_region():
    """The gate reads only the top-right quadrant (a red or blue patch; green squares and grey texture elsewhere):
    Grad-CAM and IG of the routed expert's logit and weight put >= 70 % of their positive mass there."""
    images, colour = region_images(n=24)
    (r0, r1), (c0, c1) = IMAGE_REGION
    assert (r1 - r0) * (c1 - c0) / images[0, 0].size == 0.25  # 70 % inside is far above the area share
    model = TinyMoENet(RedBlueGate(region=FEAT_REGION), k=2).eval()
    res = attribution.gate_attribution(model, "moe1", _norm_input(images, None, None), n_examples=12, ig_steps=16)
    assert np.array_equal(res["top1"], colour)  # red -> E0, blue -> E1
    assert res["targets"] == ["logit", "weight"] and res["feature_size"] == (16, 16)
    for t in res["targets"]:
        cam = attribution.upsample(res["gradcam"][t][np.arange(len(colour)), res["top1"]], (32, 32))
        assert _inside(cam, IMAGE_REGION).min() >= 0.7, t
        for e, ids in enumerate(res["examples"]):
            assert len(ids) == 12 and set(colour[ids]) == {e}
            ig = res["ig"][t][e]
            assert np.all(np.clip(ig, 0, None).sum((1, 2)) > 0)
            assert _inside(ig, IMAGE_REGION).min() >= 0.7, (t, e)
        assert res["ig_relative_delta"][t] < 1e-3  # IG completeness holds
    # the summary's mean map has its centre of mass in the top-right quadrant
    s = attribution.summarise_gate_attribution(res, (32, 32))
    for com in s["logit"]["gradcam_center_of_mass"]:
        assert com[0] < 0.5 < com[1]


def test_whole_image_gate_spreads_attribution():
    """Control: the same images with a gate reading the whole map — the planted quadrant is not special, so the
    region criterion is not met trivially by the method."""
    images, colour = region_images(n=8, seed=3)
    images[:, :, 16:, :16] = images[:, :, :16, 16:]  # copy the coloured patch to the bottom-left quadrant too
    model = TinyMoENet(RedBlueGate(region=None), k=2).eval()
    res = attribution.gate_attribution(model, "moe1", _norm_input(images, None, None), n_examples=4, ig_steps=16)
    cam = attribution.upsample(res["gradcam"]["logit"][np.arange(8), res["top1"]], (32, 32))
    assert np.all(np.abs(_inside(cam, IMAGE_REGION) - 0.5) < 0.1)


# ------------------------------------------------------------------------------------------ contribution
@pytest.mark.parametrize("k", [1, 2])
def test_identical_experts_contribute_nothing(k):
    images, group = colour_texture_images(n=40)
    x = _norm_input(images, None, None)
    model = TinyMoENet(RedBlueGate(), k=k, identical=True, gate2=BrightGate()).eval()
    ref = attribution.expert_contribution(model, "moe1", x, group, ig_steps=8, single_pass=False)
    assert not ref["single_pass"]
    if k == 1:  # one expert with weight 1: forced and own routing compute the same numbers
        assert np.array_equal(ref["forced"], np.broadcast_to(ref["default"], ref["forced"].shape))
        assert np.all(ref["delta_true"] == 0)
        assert all(np.all(m == 0) for d in ref["ig"] for m in d.values())
    else:  # w0·y + w1·y with w0 + w1 = 1: zero up to float rounding
        assert np.abs(ref["forced"] - ref["default"][None]).max() < 1e-6
    fast = attribution.expert_contribution(model, "moe1", x, group, ig_steps=8)
    assert fast["single_pass"] and np.abs(fast["forced"] - fast["default"][None]).max() < 1e-6
    s = attribution.summarise_contribution(fast, group, CLASS_NAMES)
    assert np.allclose(s["interchangeability"]["prediction_agreement"], 1.0)
    assert all(abs(p["delta_true_mean"]) < 1e-6 and p["prediction_changed"] == 0 for p in s["per_expert"])


def test_contribution_single_pass_matches_separate_forwards_with_a_skip_connection():
    """resnet10_tiny's ResBlock-MoE adds a skip path around the MoE layer: the routings are stacked at the block
    and give the logits of separate routing_override forwards."""
    import moecnn

    torch.manual_seed(0)
    model = moecnn.create_model("resnet10_tiny", num_classes=4, moe="resblock", position=4, num_experts=3,
                                k=2).eval()
    name, layer = next(iter(moecnn.moe_layers(model).items()))
    x = torch.randn(20, 3, 16, 16)
    y = np.arange(20) % 4
    at = attribution._stack_point(model, layer, name, 3, x[:8])
    assert at is not None and at is not layer  # the layer itself fails (skip connection), its block passes
    fast = attribution.expert_contribution(model, name, x, y, ig_steps=8)
    slow = attribution.expert_contribution(model, name, x, y, ig_steps=8, single_pass=False)
    assert fast["single_pass"] and not slow["single_pass"]
    assert np.allclose(fast["forced"], slow["forced"], atol=1e-4) and np.allclose(fast["default"], slow["default"],
                                                                                  atol=1e-4)
    with torch.no_grad(), moecnn.routing_override(model, force=2, layer=name):
        assert np.allclose(model(x).numpy(), fast["forced"][2], atol=1e-4)
    for e in range(3):  # IG of the difference: same maps both ways, completeness with the chosen sets held fixed
        for d in ("helps", "hurts"):
            assert np.allclose(fast["ig"][e][d], slow["ig"][e][d], atol=1e-4)
    assert fast["ig_relative_delta"] < 0.02
    s = attribution.summarise_contribution(fast, y, CLASS_NAMES, min_images=2)
    for p in s["per_expert"]:
        assert all(h["delta_true"] > 0 for h in p["helps"]) and all(h["delta_true"] < 0 for h in p["hurts"])
        assert p["delta_true_mean"] == pytest.approx(fast["delta_true"][p["expert"]].mean())


# ------------------------------------------------------------------------------------------ attribute tests
def test_colour_gate_hue_significant_edges_not(tmp_path):
    """Routing by colour (images whose texture is independent of colour): hue is significant after BH, edge
    density, high-frequency energy and contrast are not; the summary, the figures and the BH family agree."""
    images, group = colour_texture_images(n=200, seed=1)
    labels = 2 * group + np.arange(200) % 2
    model = TinyMoENet(RedBlueGate(), k=1).eval()
    s = analyze(tmp_path, model=model, images=images, labels=labels, max_tsne=60, n_perm=200, progress=False,
                compute_accuracy_with_model=False, **NAMES)
    at = s["per_layer"]["moe1"]["attribute_tests"]
    assert set(at) == {"hue", "saturation", "brightness", "contrast", "high_freq", "edge_density"}
    assert at["hue"]["significant_bh"] and at["hue"]["effect"] > 0.8 and at["hue"]["test"] == "circular_eta2"
    for a in ("edge_density", "high_freq", "contrast"):
        assert not at[a]["significant_bh"], (a, at[a]["p_bh"])
    fam = s["tests"]["family"]
    assert s["tests"]["n_tests"] == len(fam) == 2 + 6  # specialisation (class, superclass) + attributes
    hue = next(t for t in fam if t["name"] == "hue")
    assert hue["p_bh"] == pytest.approx(at["hue"]["p_bh"]) and hue["p_bh"] >= hue["p"]
    assert (tmp_path / "analysis" / s["per_layer"]["moe1"]["figures"]["attributes"]).is_file()
    assert s["headline"]["moe1"]["attributes_significant"][0] == "hue"
    disk = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert disk["schema_version"] == 2 and disk["tests"]["alpha"] == 0.05


def test_no_structure_rejects_at_the_nominal_rate():
    """Images with random colour and texture, routing independent of them: over 40 runs the BH-corrected family
    of attribute tests rejects anything at most at a binomial tolerance of alpha, and the raw permutation
    p-values reject at about alpha."""
    from scipy.stats import binom

    alpha, runs = 0.05, 40
    family_rejects, raw = 0, []
    for r in range(runs):
        images, _ = colour_texture_images(n=120, seed=100 + r, structured=False)
        chosen = np.random.default_rng(r).integers(0, 3, 120)
        tests = explain.attribute_tests(image_attributes(images), chosen, n_perm=199, seed=r)
        p = [t["p_perm"] for t in tests.values()]
        assert len(p) == 6
        raw += p
        reject, _ = stats.bh_adjust(p, alpha)
        family_rejects += bool(reject.any())
    assert family_rejects <= binom.ppf(0.999, runs, alpha)
    n_raw = int(np.sum(np.asarray(raw) <= alpha))
    lo, hi = binom.ppf(0.0005, len(raw), alpha), binom.ppf(0.9995, len(raw), alpha)
    assert lo <= n_raw <= hi, (n_raw, lo, hi)


# ------------------------------------------------------------------------------------------ concepts
def _concept_csv(path, ids, concepts, header=True):
    path.write_text(("image_id,concept\n" if header else "") + "".join(f"{i},{c}\n" for i, c in zip(ids, concepts)))
    return path


def test_concepts_follow_routing(tmp_path):
    images, labels = colour_texture_images(n=120, seed=2)
    rt = planted_routing(labels * 2)  # expert = superclass of class 2·group = group
    ids = np.arange(0, 120, 2)
    f = _concept_csv(tmp_path / "c.csv", ids, np.where(labels[ids] == 0, "warm", "cool"))
    s = analyze(tmp_path / "run", routing=rt, images=images, concepts=f, max_tsne=40, n_perm=200, progress=False,
                **NAMES)
    ct = s["per_layer"]["layer4.moe"]["concept_tests"]
    assert ct["concepts"] == ["warm" if labels[0] == 0 else "cool", "cool" if labels[0] == 0 else "warm"]
    assert ct["n_labelled"] == 60 and sum(map(sum, ct["counts"])) == 60
    assert ct["test"]["significant_bh"] and ct["test"]["effect"] == pytest.approx(1.0)
    assert ct["test"]["nmi"] == pytest.approx(1.0)
    # unrelated concepts: not significant
    g = _concept_csv(tmp_path / "g.csv", ids, np.random.default_rng(0).choice(["a", "b", "c"], ids.size))
    r = analyze(tmp_path / "run2", routing=rt, concepts=g, max_tsne=40, n_perm=200, progress=False, **NAMES)
    assert not r["per_layer"]["layer4.moe"]["concept_tests"]["test"]["significant_bh"]


@pytest.mark.parametrize("rows, match", [
    ("image_id,concept\n0,a\n1\n", r"line 3: expected 2 fields"),
    ("0,a\nx,b\n", r"line 2: image_id 'x' is not an integer"),
    ("0,a\n10,b\n", r"line 2: image_id 10 is outside 0\.\.9"),
    ("0,a\n0,b\n", r"line 2: image_id 0 already has a concept \(line 1\)"),
    ("0,a\n1,a\n", r"found 1 distinct concept"),
    ("0,a\n1, \n", r"line 2: empty concept"),
])
def test_concepts_file_errors_are_one_line(tmp_path, rows, match):
    f = tmp_path / "bad.csv"
    f.write_text(rows)
    with pytest.raises(ValueError, match=match) as e:
        read_concepts(f, 10)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not found"):
        read_concepts(tmp_path / "missing.csv", 10)


def test_cli_concepts_and_attribution_options(tmp_path, capsys):
    cli = pytest.importorskip("moecnn.cli")
    images, labels = colour_texture_images(n=60, seed=4)
    (tmp_path / "eval").mkdir()
    np.savez(tmp_path / "eval" / "routing_test.npz", **planted_routing(labels * 2), images=images)
    bad = _concept_csv(tmp_path / "bad.csv", [0, 99], ["a", "b"])
    assert cli.main(["analyze", str(tmp_path), "--concepts", str(bad), "--n-perm", "20"]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "bad.csv, line 3: image_id 99 is outside 0..59" in errors[0]
    good = _concept_csv(tmp_path / "good.csv", range(60), np.where(labels == 0, "u", "v"))
    assert cli.main(["analyze", str(tmp_path), "--concepts", str(good), "--n-perm", "50", "--max-tsne", "30",
                     "--attribution", "10", "--alpha", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "attributes (BH)" in out and "concepts: Cramér's V 1.000" in out
    s = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert s["params"]["alpha"] == 0.1 and s["params"]["attribution"] == 10
    assert any("attribution skipped: no model= and no checkpoint.pt" in n for n in s["notes"])


# ------------------------------------------------------------------------------------------ dynamics
def test_probe_dynamics_specialise_and_stay(tmp_path):
    np.savez(tmp_path / "probe_routing.npz", **probe_routing_arrays(specialise_at=3))
    probe = read_probe_routing(tmp_path)
    d = routing_dynamics(probe, n_perm=100)
    assert d["epochs"] == [0, 2, 4, 6, 8, 10, 12, 14] and d["n_probe"] == 240
    L = d["per_layer"]["moe1"]
    assert L["specialisation"]["superclass"]["specialised_from"] == 4
    assert L["specialisation"]["superclass"]["nmi"][2:] == pytest.approx([1.0] * 6)
    assert L["stable_from"] == 4 and L["kept_share"][2:] == [1.0] * 5 and L["ari"][-1] == pytest.approx(1.0)
    assert max(L["kept_share"][:2]) < 0.7 and L["agreement_with_final"][-1] == 1.0
    R = d["per_layer"]["moe2"]  # random routing at every evaluation
    assert R["stable_from"] is None and R["specialisation"]["superclass"]["specialised_from"] is None
    assert max(R["ari"]) < 0.1
    # unstable specialisation never settles
    np.savez(tmp_path / "probe_routing.npz", **probe_routing_arrays(stable=False))
    assert routing_dynamics(read_probe_routing(tmp_path), n_perm=50)["per_layer"]["moe1"]["stable_from"] is None


def test_probe_dynamics_in_analyze_and_bad_files(tmp_path):
    images, labels = colour_texture_images(n=40, seed=5)
    rt = planted_routing(labels * 2)
    s = analyze(tmp_path, routing=rt, max_tsne=30, n_perm=30, progress=False, **NAMES)
    assert s["dynamics"] is None and any("no probe_routing.npz" in n for n in s["notes"])
    arrays = probe_routing_arrays(layers=("layer4.moe",))
    np.savez(tmp_path / "probe_routing.npz", **arrays)
    s = analyze(tmp_path, routing=rt, max_tsne=30, n_perm=30, progress=False, **NAMES)
    assert s["dynamics"]["per_layer"]["layer4.moe"]["specialisation"]["superclass"]["specialised_from"] == 4
    assert (tmp_path / "analysis" / s["dynamics"]["figures"]["layer4.moe"]).is_file()
    for drop, match in (("layer4.moe/weights", "missing key 'layer4.moe/weights'"),
                        ("epochs", "missing key 'epochs'")):
        np.savez(tmp_path / "probe_routing.npz", **{k: v for k, v in arrays.items() if k != drop})
        with pytest.raises(ValueError, match=match) as e:
            read_probe_routing(tmp_path)
        assert "probe_routing.npz" in str(e.value)
    np.savez(tmp_path / "probe_routing.npz", **{**arrays, "layer4.moe/top1": arrays["layer4.moe/top1"][:, :5]})
    with pytest.raises(ValueError, match=r"'layer4.moe/top1' has shape \(8, 5\)"):
        read_probe_routing(tmp_path)


# ------------------------------------------------------------------------------------------ flow
def test_layer_flow_planted_and_independent():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, 600)
    b = np.where(rng.random(600) < 0.9, (a + 1) % 3, rng.integers(0, 3, 600))  # b follows a
    c = rng.integers(0, 4, 600)  # c independent of b
    pairs = layer_flow({"l1": a, "l2": b, "l3": c}, {"l1": 3, "l2": 3, "l3": 4}, ["l1", "l2", "l3"], n_perm=200)
    assert [(p["from"], p["to"]) for p in pairs] == [("l1", "l2"), ("l2", "l3")]
    assert pairs[0]["nmi"] > 0.5 and pairs[0]["nmi_p"] < 0.01 and pairs[0]["cramers_v"] > 0.8
    assert np.argmax(pairs[0]["counts"], axis=1).tolist() == [1, 2, 0]
    assert pairs[1]["nmi_p"] > 0.05 and np.asarray(pairs[1]["counts"]).shape == (3, 4)
    assert np.allclose(np.asarray(pairs[0]["row_share"]).sum(1), 1.0)


def test_model_with_two_moe_layers_flow_and_attribution(tmp_path):
    """End to end with the model: two MoE layers (colour, then brightness), attribution on, probe file present."""
    images, group = colour_texture_images(n=120, seed=6)
    labels = 2 * group + np.arange(120) % 2
    np.savez(tmp_path / "probe_routing.npz", **probe_routing_arrays())
    model = TinyMoENet(RedBlueGate(), k=2, gate2=BrightGate()).eval()
    s = analyze(tmp_path, model=model, images=images, labels=labels, max_tsne=30, n_perm=100, progress=False,
                attribution=40, attribution_examples=2, ig_steps=8, compute_accuracy_with_model=False, **NAMES)
    assert s["layers"] == ["moe1", "moe2"] and len(s["flow"]["pairs"]) == 1
    assert s["per_layer"]["moe2"]["attribute_tests"]["brightness"]["significant_bh"]
    for name in ("moe1", "moe2"):
        L = s["per_layer"][name]
        g, c = L["gate_attribution"], L["contribution"]
        assert g["n_images"] == 40 and g["targets"] == ["logit", "weight"] and sum(g["routed"]) == 40
        assert np.asarray(g["logit"]["gradcam_mean"]).shape == (2, 16, 16)
        assert all(len(ex) <= 2 for ex in g["examples"]) and c["n_images"] == 40 and c["single_pass"]
        for key in ("attribution_mean", "attribution_examples", "contribution", "interchangeability",
                    "contribution_examples", "attributes"):
            assert (tmp_path / "analysis" / L["figures"][key]).is_file(), key
        npz = np.load(tmp_path / "analysis" / g["image_indices_file"])
        assert npz["gradcam_logit"].shape == (40, 2, 16, 16) and npz["forced_logits"].shape == (2, 40, 4)
    kinds = {t["kind"] for t in s["tests"]["family"]}
    assert kinds == {"specialisation", "attribute", "flow"}
    assert s["dynamics"]["per_layer"]["moe1"]["stable_from"] == 4


# ------------------------------------------------------------------------------------------ detection attributes
def test_detection_attribute_tests_size_not_aspect():
    from moecnn.analysis.detection import apply_bh_heads, detection_attribute_tests

    rng = np.random.default_rng(0)
    area = 10 ** rng.uniform(1, 4, 400)
    aspect = 2 ** rng.normal(0, 0.5, 400)
    level = np.clip(np.log10(area).astype(int), 0, 4)
    expert = (area > 1000).astype(int)  # big objects -> E1, independent of the aspect ratio
    tests = detection_attribute_tests(area, aspect, level, expert, n_perm=200)
    summary = {"heads": {"cls": {"attribute_tests": tests},
                         "reg": {"attribute_tests": detection_attribute_tests(area, aspect, level,
                                                                              rng.integers(0, 2, 400), n_perm=200)}}}
    apply_bh_heads(summary)
    cls = summary["heads"]["cls"]["attribute_tests"]
    assert cls["object_area"]["significant_bh"] and cls["object_area"]["effect"] > 0.5
    assert cls["fpn_level"]["significant_bh"] and cls["fpn_level"]["test"] == "chi2"
    assert not cls["aspect_ratio"]["significant_bh"]
    assert not any(t["significant_bh"] for t in summary["heads"]["reg"]["attribute_tests"].values())
    assert summary["tests"]["n_tests"] == 6 and summary["tests"]["family"][0]["layer"] == "cls head"


def test_detection_run_attribute_tests_end_to_end(tmp_path):
    """A tiny trained RetinaNet-MoE run: `analyze` adds area / aspect / FPN-level tests per head with BH, and the
    report shows them."""
    from moecnn.analysis import report
    from moecnn.train import load_config, train

    over = [f"data.shapes.out={tmp_path / 'shapes'}", "data.shapes.num_train=4", "data.shapes.num_val=4",
            "data.shapes.image_size=64", "data.num_workers=0", "model.min_size=64", "model.max_size=64",
            "model.fpn_channels=16", "model.head_convs=1", "model.head_norm=none", "model.num_experts=2",
            "model.score_thresh=0.0", "model.detections_per_img=10", "train.epochs=1", "optim.batch_size=4",
            "optim.warmup_epochs=0", "log.tensorboard=false", "log.progress=none", "train.device=cpu"]
    run = tmp_path / "run"
    train(load_config("detection_shapes", over), run)
    s = analyze(run, n_perm=50, progress=False)
    assert s["task"] == "detection" and s["tests"]["n_tests"] == 6
    for head in ("cls", "reg"):
        at = s["detection"]["heads"][head]["attribute_tests"]
        assert set(at) == {"object_area", "aspect_ratio", "fpn_level"}
        assert all(0 < t["p_bh"] <= 1 and t["n"] == s["detection"]["num_gt"] for t in at.values())
    html = report(run).read_text()
    assert "Object attributes vs top-1 expert" in html and "aspect_ratio" in html


def test_trained_run_attribution_through_the_cli(tmp_path, capsys):
    """A real (tiny) run directory: `moecnn analyze RUN --attribution N` loads the model and the data through
    compute.load_for_analysis and fills every new section."""
    from moecnn.cli import main
    from moecnn.train import load_config, train

    tiny = ["data.image_size=16", "data.synthetic_train_size=128", "data.val_size=32", "data.synthetic_test_size=64",
            "model.width=8", "optim.batch_size=64", "train.epochs=1", "log.tensorboard=false", "log.progress=lines",
            "train.device=cpu", "train.threads=1"]
    run = tmp_path / "run"
    train(load_config("tiny", tiny), run)
    capsys.readouterr()
    assert main(["analyze", str(run), "--attribution", "24", "--attribution-examples", "2", "--n-perm", "30",
                 "--max-tsne", "30"]) == 0
    s = json.loads((run / "analysis" / "summary.json").read_text())
    (name,) = s["layers"]
    L = s["per_layer"][name]
    assert L["gate_attribution"]["n_images"] == 24 and L["contribution"]["n_images"] == 24
    assert set(L["attribute_tests"]) >= {"brightness", "edge_density"} and s["tests"]["n_tests"] >= 6
    assert not any("attribution skipped" in n for n in s["notes"])
    assert "forced E0" in capsys.readouterr().out


@pytest.mark.parametrize("kw", [dict(moe="conv", position=1, gate="spatial"),  # per-pixel routing
                                dict(moe="resblock", position=4, stacked=True)],  # channel-stacked experts
                         ids=["spatial_gate", "stacked_experts"])
def test_attribution_on_other_layer_kinds(kw):
    import moecnn

    torch.manual_seed(0)
    model = moecnn.create_model("resnet10_tiny", num_classes=4, width=8, num_experts=3, k=2, **kw).eval()
    name = next(iter(moecnn.moe_layers(model)))
    x = torch.randn(10, 3, 16, 16)
    y = np.arange(10) % 4
    g = attribution.gate_attribution(model, name, x, n_examples=2, ig_steps=8)
    assert g["targets"] == ["logit", "weight"] and g["weights"].sum(1) == pytest.approx(np.ones(10), abs=1e-5)
    assert all(d < 0.05 for d in g["ig_relative_delta"].values())
    fast = attribution.expert_contribution(model, name, x, y, ig_steps=8)
    slow = attribution.expert_contribution(model, name, x, y, ig_steps=8, single_pass=False)
    assert fast["single_pass"] and np.allclose(fast["forced"], slow["forced"], atol=1e-4)
    assert np.allclose(fast["default"], slow["default"], atol=1e-4)
