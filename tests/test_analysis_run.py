"""End-to-end analyze() on planted structure: from routing arrays and from a model with a fixed gate."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _analysis_fixtures import (CLASS_NAMES, CLASS_TO_SUPER, SUPER_NAMES, planted_images,  # noqa: E402
                                planted_model, planted_routing)

from moecnn.analysis import analyze, load_routing  # noqa: E402

NAMES = dict(class_names=CLASS_NAMES, superclass_names=SUPER_NAMES, class_to_super=CLASS_TO_SUPER)


@pytest.fixture(scope="module")
def data():
    return planted_images(n_per_class=50)


def test_planted_routing_arrays_found(tmp_path, data):
    images, labels = data
    rt = planted_routing(labels)
    np.savez(tmp_path / "rt.npz", **rt)
    s = analyze(tmp_path / "run", routing=tmp_path / "rt.npz", images=images, max_tsne=150, n_perm=200,
                progress=False, **NAMES)
    L = s["per_layer"]["layer4.moe"]
    sup = L["specialisation"]["superclass"]
    assert sup["nmi"] > 0.95 and sup["nmi_p"] < 0.01 and sup["purity"] == pytest.approx(1.0)
    assert L["superclass_expert"]["top_text"][0].startswith("expert 0: flowers")
    assert set(L["class_expert"]["top"][1][:2]) == {"truck", "bus"}
    # summary.json round-trips and names every figure that exists
    disk = json.loads((tmp_path / "run" / "analysis" / "summary.json").read_text())
    assert disk["per_layer"]["layer4.moe"]["specialisation"]["superclass"]["nmi"] == pytest.approx(sup["nmi"])
    for rel in L["figures"].values():
        assert (tmp_path / "run" / "analysis" / rel).is_file()
    assert "tsne_thumbnails" in L["figures"] and "tsne_E1" in L["figures"] and "most_E0" in L["figures"]
    assert len(L["tsne"]["coords"]) == 150


def test_random_routing_not_significant(tmp_path, data):
    images, labels = data
    s = analyze(tmp_path, routing=planted_routing(labels, random=True), max_tsne=60, n_perm=200,
                progress=False, **NAMES)
    sup = s["per_layer"]["layer4.moe"]["specialisation"]["superclass"]
    assert sup["nmi"] < 0.05 and sup["nmi_p"] > 0.01
    assert s["per_layer"]["layer4.moe"]["tsne"]["n_points"] == 60
    assert "tsne_thumbnails" not in s["per_layer"]["layer4.moe"]["figures"]  # no images given


def test_model_with_fixed_gate(tmp_path, data):
    images, labels = data
    model, name = planted_model()
    s = analyze(tmp_path, model=model, images=images, labels=labels, max_tsne=100, n_perm=200, progress=False,
                **NAMES)
    L = s["per_layer"][name]
    assert L["specialisation"]["superclass"]["nmi"] > 0.95
    assert L["specialisation"]["superclass"]["nmi_p"] < 0.01
    acc = s["accuracy"]
    assert set(acc["k_sweep"]) == {"1", "2"} and set(acc["forced"]) == {"0", "1"}
    assert len(acc["default"]["per_class"]) == 4 and len(acc["default"]["per_superclass"]) == 2
    # the model under a random gate does not look specialised
    rmodel, _ = planted_model(random_gate=True)
    r = analyze(tmp_path / "rnd", model=rmodel, images=images, labels=labels, max_tsne=60, n_perm=200,
                progress=False, compute_accuracy_with_model=False, **NAMES)
    assert r["per_layer"][name]["specialisation"]["superclass"]["nmi_p"] > 0.01


def test_eval_layout_and_layer_selection(tmp_path, data):
    """Reads eval/routing_test.npz + eval/*.json like `moecnn eval` writes them; --layer selects one layer."""
    images, labels = data
    rt = planted_routing(labels)
    rt2 = planted_routing(labels, n_experts=3, random=True, seed=5)
    arrays = {**rt, "layers": np.array(["layer3.moe", "layer4.moe"]),
              "layer3.moe/logits": rt2["layer4.moe/logits"], "layer3.moe/weights": rt2["layer4.moe/weights"],
              "superlabels": np.asarray(CLASS_TO_SUPER)[labels], "class_names": np.array(CLASS_NAMES),
              "superclass_names": np.array(SUPER_NAMES), "preds": labels}
    ev = tmp_path / "eval"
    ev.mkdir()
    np.savez_compressed(ev / "routing_test.npz", **arrays)
    res = {"top1": 90.0, "per_class": [90.0] * 4, "per_superclass": [90.0, 90.0]}
    (ev / "test.json").write_text(json.dumps(res))
    (ev / "k_sweep.json").write_text(json.dumps({"results": {"1": res, "2": {**res, "top1": 91.0}}}))
    (ev / "forced.json").write_text(json.dumps({"results": {"0": {**res, "top1": 50.0}, "1": res}}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"epoch": e, "routing": {"layer4.moe": {"importance": [0.5 + 0.1 * e, 0.5 - 0.1 * e], "routed": [1, 1]}}})
        for e in range(3)) + "\n")
    parsed = load_routing(ev / "routing_test.npz")
    assert list(parsed["layers"]) == ["layer3.moe", "layer4.moe"]
    s = analyze(tmp_path, max_tsne=60, n_perm=50, progress=False)
    assert s["layers"] == ["layer3.moe", "layer4.moe"] and s["class_names"] == CLASS_NAMES
    assert s["class_to_super"] == CLASS_TO_SUPER
    assert s["accuracy"]["k_sweep"]["2"]["top1"] == 91.0 and s["accuracy"]["forced"]["0"]["top1"] == 50.0
    assert s["training"]["per_layer"]["layer4.moe"]["epoch"] == [0, 1, 2]
    assert s["per_layer"]["layer3.moe"]["num_experts"] == 3
    one = analyze(tmp_path, layer="layer4.moe", max_tsne=60, n_perm=50, progress=False)
    assert one["layers"] == ["layer4.moe"]
    with pytest.raises(ValueError, match="no MoE layer"):
        analyze(tmp_path, layer="nope", max_tsne=60, n_perm=10, progress=False)


def test_cli_verbs(tmp_path, data, capsys):
    cli = pytest.importorskip("moecnn.cli")
    images, labels = data
    (tmp_path / "eval").mkdir()
    np.savez(tmp_path / "eval" / "routing_test.npz", **planted_routing(labels))
    assert cli.main(["analyze", str(tmp_path), "--max-tsne", "50", "--n-perm", "20"]) == 0
    out = capsys.readouterr().out
    assert "NMI(top-1 expert, class)" in out and (tmp_path / "analysis" / "summary.json").is_file()
    assert cli.main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").is_file()
    assert cli.main(["analyze", str(tmp_path), "--layer", "nope", "--n-perm", "5"]) != 0
