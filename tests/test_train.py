"""Training loop, run directory, resume, non-finite handling, seeds and evaluation (CPU, tiny synthetic)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moecnn.cli import main
from moecnn.train import collect_routing, load_config, load_run, run_eval, train
from moecnn.train import loop
from moecnn.train.loop import routing_health

# ~0.3 s per epoch: 16x16 images, width-8 ResNet-10, 192 training images, batch 64
TINY = [
    "data.image_size=16", "data.synthetic_train_size=256", "data.val_size=64", "data.synthetic_test_size=64",
    "model.width=8", "optim.batch_size=64", "train.epochs=2", "log.tensorboard=false", "log.progress=lines",
    "train.device=cpu", "train.threads=1",
]


def cfg(*extra):
    return load_config("tiny", TINY + list(extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    final = train(cfg("train.deterministic=true"), run)
    return run, final


def test_run_dir_layout(trained):
    run, final = trained
    for f in ("config.yaml", "meta.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "final.json"):
        assert (run / f).is_file(), f
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    r = recs[-1]
    assert {"loss", "loss/task", "loss/layer4.moe/kl", "top1"} <= set(r["train"])
    assert {"top1", "top5", "loss"} <= set(r["val"])
    rt = r["routing"]["layer4.moe"]
    assert abs(sum(rt["importance"]) - 1) < 1e-4 and abs(sum(rt["routed"]) - 2) < 1e-4
    assert r["lr"] > 0 and r["images_per_s"] > 0
    meta = json.loads((run / "meta.json").read_text())
    assert meta["seed"] == 0 and "torch" in meta and "command" in meta
    assert final["epoch"] == 1 and final["checkpoint"] == "checkpoint.pt"
    assert 0 <= final["test"]["top1"] <= 100 and final["val"]["top1"] is not None
    assert json.loads((run / "final.json").read_text()) == json.loads(json.dumps(final))


def test_resume_matches_uninterrupted(trained, tmp_path):
    run, final = trained
    part = tmp_path / "part"
    stopped = train(cfg("train.deterministic=true", "train.stop_after_epochs=1"), part)
    assert stopped["stopped_after_epoch"] == 0 and not (part / "final.json").exists()
    assert torch.load(part / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert main(["train", "--resume", str(part)]) == 0
    resumed = json.loads((part / "final.json").read_text())
    assert resumed == json.loads((run / "final.json").read_text())  # bit-identical metrics
    a = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(part / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 2
    assert "resumes" in json.loads((part / "meta.json").read_text())


def test_resume_after_the_last_epoch_only_runs_the_final_evaluation(trained, tmp_path, capsys):
    """A run stopped after its last checkpoint but before final.json (e.g. killed by a time limit) resumes into
    the final evaluation alone and reports what the uninterrupted run reported; a finished run refuses."""
    import shutil

    run, _ = trained
    part = tmp_path / "cut"
    shutil.copytree(run, part)
    (part / "final.json").unlink()
    metrics = (part / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(part)]) == 0
    assert "all 2 epochs are done" in capsys.readouterr().out
    assert json.loads((part / "final.json").read_text()) == json.loads((run / "final.json").read_text())
    assert (part / "metrics.jsonl").read_text() == metrics  # no epoch redone or dropped
    assert main(["train", "--resume", str(part)]) == 2
    assert "already finished 2 of 2 epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(part), "train.epochs=1"]) == 2  # fewer epochs than trained: refused
    assert "already finished 2 of 1 epochs" in capsys.readouterr().err
    (part / "final.json").unlink()
    assert main(["train", "--resume", str(part), "train.epochs=1"]) == 2  # also without final.json
    import yaml

    assert yaml.safe_load((part / "config.yaml").read_text())["train"]["epochs"] == 2  # the refusal changed nothing


def test_extending_a_finished_run_keeps_its_result_and_can_finish_after_a_cut(trained, tmp_path, monkeypatch):
    """--resume train.epochs=N+1 on a finished N-epoch run moves the old final.json aside; if the extension is
    cut after its last checkpoint, the next --resume runs only the final evaluation (the stale result of the
    shorter run does not block it)."""
    import shutil

    run, _ = trained
    part = tmp_path / "ext"
    shutil.copytree(run, part)
    old = json.loads((part / "final.json").read_text())
    real = loop.save_json

    def cut(path, obj):  # the extension is killed while writing its final.json
        if path.name == "final.json":
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(loop, "save_json", cut)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("train.deterministic=true", "train.epochs=3"), part, resume=True)
    assert json.loads((part / "final_2_epochs.json").read_text()) == old and not (part / "final.json").exists()
    assert torch.load(part / "checkpoint.pt", weights_only=False)["epoch"] == 3
    monkeypatch.setattr(loop, "save_json", real)
    final = train(cfg("train.deterministic=true", "train.epochs=3"), part, resume=True)
    assert final["epoch"] == 2 and json.loads((part / "final.json").read_text())["epoch"] == 2


def test_nonfinite_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import moecnn.tasks.classification as cls

    real = cls.aux_loss
    calls = {"n": 0}

    def poisoned(model):
        calls["n"] += 1
        total, terms = real(model)
        bad = {k: v * float("nan") for k, v in terms.items()}
        return (total * float("nan"), bad) if calls["n"] > 3 else (total, terms)  # 3 steps per epoch

    monkeypatch.setattr(cls, "aux_loss", poisoned)
    run = tmp_path / "r"
    rc = main(["train", "--config", "tiny", "--out", str(run), *TINY, "log.check_every=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: non-finite loss at epoch 1, step 0"), err
    assert "1 finished epochs" in err[0]
    ck = torch.load(run / "checkpoint.pt", weights_only=False)  # epoch 0's checkpoint survived intact
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (run / "final.json").exists()


def test_collapse_warning_after_patience():
    streak = {}
    collapsed = {"moe": {"importance": [10.0, 0.0, 0.0, 0.0], "routed": [10.0, 0.0, 0.0, 0.0]}}
    healthy = {"moe": {"importance": [1.0, 1.0, 1.0, 1.0], "routed": [2.0, 2.0, 2.0, 2.0]}}
    import copy

    assert routing_health(copy.deepcopy(collapsed), streak, 3) == []
    assert routing_health(copy.deepcopy(collapsed), streak, 3) == []
    w = routing_health(copy.deepcopy(collapsed), streak, 3)
    assert len(w) == 1 and "only 1 of 4 experts" in w[0]
    h = copy.deepcopy(healthy)
    assert routing_health(h, streak, 3) == [] and streak["moe"] == 0 and h["moe"]["living"] == 4
    assert h["moe"]["importance"] == [0.25] * 4 and h["moe"]["routed"] == [0.5] * 4


def test_eval_suite_and_routing_npz(trained):
    run, _ = trained
    summary = run_eval(run, device="cpu")
    ev = run / "eval"
    for f in ("test.json", "k_sweep.json", "forced.json", "disabled.json", "dense.json", "summary.json",
              "routing_test.npz"):
        assert (ev / f).is_file(), f
    assert set(summary["k_sweep"]) == {"1", "2", "3", "4"} and set(summary["forced"]) == {"0", "1", "2", "3"}
    test = json.loads((ev / "test.json").read_text())
    assert len(test["per_class"]) == 10 and len(test["per_superclass"]) == 2
    assert abs(summary["k_sweep"]["2"]["top1"] - summary["default"]["top1"]) < 1e-6  # trained k
    z = np.load(ev / "routing_test.npz")
    n = len(z["labels"])
    assert n == 64 and list(z["layers"]) == ["layer4.moe"]
    assert z["layer4.moe/logits"].shape == (n, 4) and z["layer4.moe/weights"].shape == (n, 4)
    assert np.allclose(z["layer4.moe/weights"].sum(1), 1, atol=1e-5)
    assert ((z["layer4.moe/weights"] > 0).sum(1) == 2).all()
    assert (z["layer4.moe/top1"] == z["layer4.moe/weights"].argmax(1)).all()
    assert z["superlabels"].shape == (n,) and set(np.unique(z["superlabels"])) <= {0, 1}
    assert len(z["class_names"]) == 10 and len(z["superclass_names"]) == 2
    one = run_eval(run, k=1, device="cpu")
    assert one["top1"] == pytest.approx(summary["k_sweep"]["1"]["top1"])
    assert (ev / "custom_k1.json").is_file()
    forced = run_eval(run, force_expert=3, device="cpu")
    assert forced["top1"] == pytest.approx(summary["forced"]["3"]["top1"])
    # flip test-time augmentation: written beside the plain number; the custom setting reproduces it
    tta = json.loads((ev / "test_tta_flip.json").read_text())
    assert tta["tta"] == "flip" and summary["tta_flip"]["top1"] == pytest.approx(tta["top1"])
    again = run_eval(run, tta="flip", device="cpu")
    assert again["setting"] == "ttaflip" and again["top1"] == pytest.approx(tta["top1"])
    with pytest.raises(ValueError, match="tta"):
        run_eval(run, tta="crop", device="cpu")


def test_val_split_eval_never_overwrites_the_test_suite(trained, tmp_path):
    import shutil

    from moecnn.analysis.rundir import read_eval_accuracy

    run = tmp_path / "run"
    shutil.copytree(trained[0], run, ignore=shutil.ignore_patterns("eval"))
    test = run_eval(run, device="cpu")
    val = run_eval(run, device="cpu", split="val")
    ev = run / "eval"
    for name in ("k_sweep", "forced", "disabled", "dense", "summary"):
        assert json.loads((ev / f"{name}.json").read_text())["split"] == "test"
        assert json.loads((ev / f"val_{name}.json").read_text())["split"] == "val"
    assert (ev / "test.json").is_file() and (ev / "val.json").is_file()
    assert read_eval_accuracy(run, "test")["k_sweep"]["1"]["top1"] == pytest.approx(test["k_sweep"]["1"]["top1"])
    assert read_eval_accuracy(run, "val")["k_sweep"]["1"]["top1"] == pytest.approx(val["k_sweep"]["1"]["top1"])
    one = run_eval(run, k=1, device="cpu", split="val")
    assert one["file"].endswith("val_custom_k1.json") and one["top1"] == pytest.approx(val["k_sweep"]["1"]["top1"])


def test_evaluate_flip_tta_averages_mirror_logits():
    """tta='flip' scores each image by the mean of its logits and its mirror's, as a direct computation on a
    model that is not mirror-symmetric confirms (and the plain evaluation differs)."""
    from moecnn.train.evaluate import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5))
    x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 5, (40,))
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    plain = evaluate(model, loader, 5, torch.device("cpu"))
    flip = evaluate(model, loader, 5, torch.device("cpu"), tta="flip")
    with torch.no_grad():
        avg = 0.5 * (model(x) + model(x.flip(-1)))
        ref = torch.nn.functional.cross_entropy(avg, y).item()
        ref1 = 100 * (avg.argmax(1) == y).float().mean().item()
    assert flip["loss"] == pytest.approx(ref, rel=1e-5) and flip["top1"] == pytest.approx(ref1)
    assert flip["loss"] != pytest.approx(plain["loss"], rel=1e-3)


def test_load_run_and_collect_routing(trained):
    run, _ = trained
    model, c, task = load_run(run, which="best")
    bundle = task.bundle
    assert not model.training and c.model.num_experts == 4 and bundle.num_classes == 10
    from moecnn.data import make_loader

    loader = make_loader(bundle.test, 32, train=False, device="cpu", mean=bundle.mean, std=bundle.std,
                         augment=None)
    rt = collect_routing(model, loader)
    assert rt["layer4.moe/weights"].shape == (64, 4) and rt["preds"].shape == (64,)


def test_seeds_summary(tmp_path):
    out = tmp_path / "rep"
    rc = main(["train", "--out", str(out), "--seeds", "0,1", *TINY, "train.epochs=1",
               "data.synthetic_train_size=160"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["seeds"] == [0, 1] and len(s["test_top1"]["values"]) == 2 and s["test_top1"]["std"] >= 0
    assert json.loads((out / "seed1" / "meta.json").read_text())["seed"] == 1


def test_hard_constraint_and_sgd_step_schedule(tmp_path):
    c = cfg("model.balance=relative", "optim.name=sgd", "optim.lr=0.05", "optim.nesterov=true",
            "optim.schedule=step", "optim.milestones=[1]", "optim.label_smoothing=0.1", "train.epochs=2",
            "train.save_best=false")
    train(c, tmp_path / "r")
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["lr"] == pytest.approx(0.05) and recs[1]["lr"] == pytest.approx(0.005)
    assert "loss/layer4.moe/kl" not in recs[0]["train"]  # hard constraints have no aux loss
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert ck["model"]["layer4.moe.constraint.r"].abs().sum() > 0
    assert not (tmp_path / "r" / "best.pt").exists()


def test_lr_schedules():
    o = load_config("fast_moe").optim
    f = loop.lr_lambda(o, epochs=10, steps_per_epoch=10)
    assert f(0) == pytest.approx(1 / 20) and f(19) == pytest.approx(1.0) and f(99) < 0.02
    p = load_config("paper_moe").optim
    g = loop.lr_lambda(p, epochs=150, steps_per_epoch=5)
    assert g(80 * 5 + 4) == 1.0 and g(81 * 5) == pytest.approx(0.1) and g(120 * 5) == pytest.approx(0.01)
    b = loop.lr_lambda(load_config("paper_baseline").optim, epochs=150, steps_per_epoch=1)
    assert b(60) == 1.0 and b(61) == pytest.approx(0.1) and b(100) == pytest.approx(0.01)


def test_stacked_capacity_run_resumes_and_evaluates(tmp_path):
    """The compiled recipe's model settings (stacked experts, training capacity) through train → interrupt →
    resume → eval on the CPU: bit-identical resume, eval suite complete, no dropped slots in evaluation."""
    extra = ("model.stacked=true", "model.capacity_factor=1.25", "train.deterministic=true")
    full = train(cfg(*extra), tmp_path / "full")
    part = tmp_path / "part"
    train(cfg(*extra, "train.stop_after_epochs=1"), part)
    assert main(["train", "--resume", str(part)]) == 0
    assert json.loads((part / "final.json").read_text()) == json.loads(json.dumps(full))
    summary = run_eval(part, device="cpu")
    assert set(summary["k_sweep"]) == {"1", "2", "3", "4"} and set(summary["forced"]) == {"0", "1", "2", "3"}
    model, _, _ = load_run(part)
    from moecnn.layers import StackedExperts

    assert isinstance(model.layer4.moe.experts, StackedExperts)


def test_reduce_overhead_needs_static_shapes():
    with pytest.raises(ValueError, match="capacity_factor"):
        cfg("train.compile=true", "train.compile_mode=reduce-overhead")
    with pytest.raises(ValueError, match="compile_mode"):
        cfg("train.compile_mode=fastest")
