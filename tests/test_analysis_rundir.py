"""analyze()/report() on a real run directory (config.yaml + checkpoint.pt, synthetic data), with and without
`moecnn eval` output. Needs the training stack (moecnn.train) and the synthetic dataset."""
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("moecnn.train.runs")

import torch  # noqa: E402
import yaml  # noqa: E402

CFG = {"task": "classification",
       "data": {"name": "synthetic", "image_size": 16, "synthetic_train_size": 200, "synthetic_test_size": 120,
                "val_size": 40},
       "model": {"name": "resnet10_tiny", "moe": "resblock", "position": 4, "num_experts": 3, "k": 2,
                 "balance": "kl"},
       "train": {"device": "cpu"}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from omegaconf import OmegaConf

    from moecnn.data import build_data
    from moecnn.models import build_model
    from moecnn.train.config import load_config

    d = tmp_path_factory.mktemp("rundir")
    (d / "config.yaml").write_text(yaml.safe_dump(CFG))
    cfg = load_config(base=OmegaConf.create(CFG))
    bundle = build_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, bundle.num_classes, bundle.in_channels)
    torch.save({"model": model.state_dict(), "data": {"num_classes": bundle.num_classes,
                                                       "in_channels": bundle.in_channels}}, d / "checkpoint.pt")
    (d / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 0, "routing": {"layer4.moe": {"importance": [0.3, 0.3, 0.4], "routed": [0.6, 0.7, 0.7]}}}) + "\n")
    return d


@pytest.mark.slow
def test_run_dir_without_eval_uses_the_model(run_dir, tmp_path):
    from moecnn.analysis import analyze, report

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    s = analyze(d, max_tsne=80, n_perm=50, progress=False)
    assert s["sources"]["routing"].startswith("computed with the model")
    assert (d / "analysis" / "routing_test.npz").is_file()
    assert s["n_images"] == 120 and s["superclass_names"] == ["stripes", "blobs"]
    assert len(s["class_names"]) == 10 and s["class_to_super"][:5] == [0] * 5
    L = s["per_layer"]["layer4.moe"]
    assert L["num_experts"] == 3 and "tsne_thumbnails" in L["figures"]
    acc = s["accuracy"]
    assert set(acc["k_sweep"]) == {"1", "2", "3"} and set(acc["disabled"]) == {"0", "1", "2"}
    assert s["training"]["per_layer"]["layer4.moe"]["epoch"] == [0]
    html = report(d).read_text()
    assert "layer4.moe" in html and "stripes" in html


@pytest.mark.slow
def test_run_dir_with_eval_output(run_dir, tmp_path):
    from moecnn.analysis import analyze, load_routing, report
    from moecnn.train import run_eval

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    run_eval(d, device="cpu", batch_size=64)
    s = analyze(d, max_tsne=80, n_perm=50, progress=False, compute_accuracy_with_model=False)
    assert s["sources"]["routing"].endswith("routing_test.npz") and "eval" in s["sources"]["routing"]
    ev = json.loads((d / "eval" / "k_sweep.json").read_text())["results"]
    assert s["accuracy"]["k_sweep"]["1"]["top1"] == pytest.approx(ev["1"]["top1"])
    tta = json.loads((d / "eval" / "test_tta_flip.json").read_text())  # trained with flips: reported beside
    assert s["accuracy"]["tta_flip"]["top1"] == pytest.approx(tta["top1"])
    assert f"flip test-time augmentation (mean logits of each image and its mirror; beside, never instead of, " \
           f"the number above): {tta['top1']:.2f} %" in report(d).read_text()
    assert "tsne_thumbnails" in s["per_layer"]["layer4.moe"]["figures"]  # images from the run's data
    # analyze's own routing (normalisation, eval mode) agrees with `moecnn eval`'s
    d2 = tmp_path / "own"
    shutil.copytree(run_dir, d2)
    analyze(d2, max_tsne=40, n_perm=10, progress=False, compute_accuracy_with_model=False)
    mine = load_routing(d2 / "analysis" / "routing_test.npz")
    theirs = load_routing(d / "eval" / "routing_test.npz")
    assert np.array_equal(mine["labels"], theirs["labels"])
    np.testing.assert_allclose(mine["layers"]["layer4.moe"]["logits"], theirs["layers"]["layer4.moe"]["logits"],
                               atol=1e-4, rtol=1e-4)
