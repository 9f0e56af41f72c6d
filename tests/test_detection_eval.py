"""COCO evaluation (both backends), size-bucket statistics on hand-made cases, and a tiny end-to-end
detection run: train → resume → eval (per k, per forced expert) → size analysis → report sections."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moecnn.analysis.detection import detection_report_sections, size_expert_independence, usage_table
from moecnn.data.coco import CocoDetection, coco_evaluate

from _shared_data import COCO, needs_coco  # noqa: E402




@pytest.fixture(scope="module")
def coco_val():
    return CocoDetection(COCO / "annotations" / "instances_val2017_subset.json", COCO / "images" / "val2017")


@needs_coco
def test_gt_as_detections_scores_one(coco_val):
    gt = coco_val.subset_gt()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"] if not a["iscrowd"]]
    for backend in ("faster", "pycocotools"):
        m = coco_evaluate(gt, dets, backend=backend)
        for key in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"):
            assert m[key] == pytest.approx(1.0), (backend, key, m)


@needs_coco
def test_backends_agree_on_noisy_detections(coco_val):
    gt = coco_val.subset_gt()
    rng = np.random.default_rng(0)
    cats = [c["id"] for c in gt["categories"]]
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.15, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() > 0.2 else int(rng.choice(cats))
        dets.append({"image_id": a["image_id"], "category_id": cat,
                     "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])], "score": float(rng.random())})
    fast = coco_evaluate(gt, dets, backend="faster")
    ref = coco_evaluate(gt, dets, backend="pycocotools")
    assert 0.05 < ref["AP"] < 0.95
    for key in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"):
        assert fast[key] == pytest.approx(ref[key], abs=2e-3), key


def test_size_test_known_answers():
    rng = np.random.default_rng(0)
    buckets = rng.integers(0, 3, 300)
    # expert 0 takes every small object, the others share the rest: strongly dependent
    experts = np.where(buckets == 0, 0, rng.integers(1, 4, 300))
    for method in ("chi2", "permutation"):
        r = size_expert_independence(buckets, experts, 3, 4, method=method, permutations=300)
        assert r["p_value"] < 0.01 and r["cramers_v"] > 0.5, (method, r)
        assert r["table"][0] == [int((buckets == 0).sum()), 0, 0, 0]
    # uniform random routing: p-values spread uniformly, rarely small
    ps = [size_expert_independence(rng.integers(0, 3, 200), rng.integers(0, 4, 200), 3, 4)["p_value"]
          for _ in range(60)]
    assert np.mean(np.array(ps) < 0.01) < 0.1 and np.median(ps) > 0.2
    r = size_expert_independence([0, 0, 0], [1, 2, 1], 3, 4)  # one bucket only: nothing to test
    assert r["degenerate"] and r["p_value"] == 1.0
    u = usage_table([0, 0, 1], np.array([[1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 1.0]]), 3, ["s", "m", "l"])
    assert u["s"]["n"] == 2 and u["s"]["mean_weight"] == [0.75, 0.25, 0.0] and u["s"]["top1_share"] == [1.0, 0, 0]
    assert u["l"]["n"] == 0


DET_TINY = ["data.shapes.num_train=8", "data.shapes.num_val=4", "data.shapes.image_size=64", "data.num_workers=0",
            "model.min_size=64", "model.max_size=64", "model.fpn_channels=32", "model.head_convs=1",
            "model.head_norm=none", "model.num_experts=3", "model.score_thresh=0.0", "model.detections_per_img=20",
            "train.epochs=1", "optim.batch_size=4", "optim.warmup_epochs=0", "train.eval_every=1",
            "log.tensorboard=false", "log.progress=none", "train.device=cpu", "train.deterministic=true"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from moecnn.train import load_config, train

    root = tmp_path_factory.mktemp("det")
    cfg = load_config("detection_shapes", DET_TINY + [f"data.shapes.out={root / 'shapes'}"])
    run = root / "run"
    final = train(cfg, run)
    return run, cfg, final


def test_train_resume_eval_analyze(tiny_run):
    from moecnn.analysis.detection import analyze_detection
    from moecnn.cli import main
    from moecnn.train import run_eval

    run, cfg, final = tiny_run
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "checkpoint.pt", "final.json"):
        assert (run / name).is_file(), name
    assert final["task"] == "detection" and final["metric"] == "AP" and 0.0 <= final["val"]["AP"] <= 1.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["train"]["loss"]) and "loss/aux" in rows[0]["train"]
    assert rows[0]["images_per_s"] > 0
    assert "head.classification_head.moe@P3" in rows[0]["routing"] and "val" in rows[0]
    # resume: one more epoch continues from the checkpoint (the same --resume as classification)
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert "resumes" in json.loads((run / "meta.json").read_text())

    ev = run_eval(run, device="cpu")  # the one evaluation entry; detection evaluates its validation split
    assert set(ev["k_sweep"]) == {"1", "2", "3"} and set(ev["forced"]) == {"0", "1", "2"}
    forced = json.loads((run / "eval" / "val_forced.json").read_text())["results"]
    for e, m in forced.items():  # all detections come from the forced expert
        assert set(m["detections_per_expert"]) <= {e}
    assert json.loads((run / "eval" / "val.json").read_text())["num_images"] == 4
    one = run_eval(run, k=1, device="cpu", which="best", batch_size=2)  # best.pt's files never replace the last's
    assert one["setting"] == "k1" and (run / "eval" / "best_val_custom_k1.json").is_file()
    assert json.loads((run / "eval" / "best_val_custom_k1.json").read_text())["checkpoint"] == "best"
    mixed = run_eval(run, disable=[0], dense=True, device="cpu")
    assert "0" not in json.loads(open(mixed["file"]).read())["detections_per_expert"]
    assert (run / "eval" / "val_custom_disable0_dense.json").is_file()
    with pytest.raises(ValueError, match="no 'test' split"):
        run_eval(run, split="test", device="cpu")

    summary = analyze_detection(run, device="cpu", num_examples=2)
    assert set(summary["heads"]) == {"cls", "reg"}
    h = summary["heads"]["cls"]
    assert sum(v["n"] for v in h["by_bucket"].values()) == summary["num_gt"] > 0
    assert 0.0 <= h["bucket_test"]["p_value"] <= 1.0
    for name in ("detection_summary.json", "detection_usage.png", "detection_examples.png"):
        assert (run / "analysis" / name).is_file(), name
    sections = detection_report_sections(run)
    titles = [t for t, _ in sections]
    assert "Detection AP (COCO, %)" in titles and any("data:image/png;base64," in h for _, h in sections)
    ap_table = dict(sections)["Detection AP (COCO, %)"]
    assert "k = 3" in ap_table and "expert 2 forced" in ap_table


def test_cli_analyze_and_report_on_detection_run(tiny_run):
    """`moecnn analyze RUN` on a detection run runs the size/level analysis; `report` embeds it."""
    from moecnn import cli

    run, _, _ = tiny_run
    assert cli.main(["analyze", str(run), "--device", "cpu"]) == 0
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert summary["task"] == "detection" and set(summary["detection"]["heads"]) == {"cls", "reg"}
    assert (run / "analysis" / "detection_summary.json").is_file()
    assert cli.main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "expert" in html.lower() and "data:image/png;base64," in html


def test_table_on_a_detection_run(tiny_run, capsys):
    """`moecnn table` reads a detection run: val AP, times from metrics.jsonl."""
    from moecnn import cli
    from moecnn.train.runs import read_metrics

    run, _, _ = tiny_run
    final = json.loads((run / "final.json").read_text())
    rows = read_metrics(run)
    assert cli.main(["table", str(run), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    ev = run / "eval" / "val.json"
    ap = json.loads(ev.read_text())["AP"] if ev.is_file() else final["val"]["AP"]
    assert row["val_ap"] == pytest.approx(ap) and row["test_top1"] is None
    assert row["train_s"] == pytest.approx(sum(r["time_s"] for r in rows))
    assert cli.main(["table", str(run)]) == 0
    assert "| val AP |" in capsys.readouterr().out
