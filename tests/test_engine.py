"""The one engine: both tasks train, stop, resume bit-identically after SIGKILL and refuse to overwrite through
the same code; the run lock; detection under DDP (gloo); timm and torchvision models with MoE targets on an
image folder through train → eval → analyze → report; upcycling equals the dense model at step 0; two torchrun
nodes on one machine; run directories that never mislead."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moecnn.cli import main
from moecnn.train import load_config, train

CLS = ["data.image_size=16", "data.synthetic_train_size=480", "data.val_size=64", "data.synthetic_test_size=64",
       "model.width=8", "optim.batch_size=32", "log.tensorboard=false", "log.progress=lines", "train.device=cpu",
       "train.threads=1", "train.deterministic=true"]
DET = ["data.shapes.num_train=16", "data.shapes.num_val=4", "data.shapes.image_size=64", "data.num_workers=0",
       "model.min_size=64", "model.max_size=64", "model.fpn_channels=32", "model.head_convs=1", "model.head_norm=none",
       "model.num_experts=3", "model.score_thresh=0.0", "model.detections_per_img=20", "optim.batch_size=4",
       "optim.warmup_epochs=0", "log.tensorboard=false", "log.progress=lines", "train.device=cpu", "train.threads=1",
       "train.deterministic=true", "train.eval_every=100"]
PRESET = {"classification": ("tiny", CLS), "detection": ("detection_shapes", DET)}


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _argv(task: str, out: Path, epochs: int, shapes: Path):
    preset, extra = PRESET[task]
    extra = extra + ([f"data.shapes.out={shapes}"] if task == "detection" else [])
    return ["train", "--config", preset, "--out", str(out), f"train.epochs={epochs}", *extra]


def _same_model(a: Path, b: Path) -> None:
    x = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    y = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "detection"])
def test_sigkill_resume_is_bit_identical_and_finished_runs_refuse(task, tmp_path, capsys):
    epochs = 4
    shapes = tmp_path / "shapes"
    ref = tmp_path / "ref"
    assert main(_argv(task, ref, epochs, shapes)) == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "moecnn.cli", *_argv(task, cut, epochs, shapes)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill as soon as one epoch is checkpointed
        if (cut / "checkpoint.pt").is_file():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (cut / "checkpoint.pt").is_file() and not (cut / "final.json").exists(), proc.stdout.read()
    done = torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < epochs
    assert main(["train", "--resume", str(cut)]) == 0
    assert json.loads((cut / "final.json").read_text()) == json.loads((ref / "final.json").read_text())
    _same_model(ref, cut)
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(epochs))
    capsys.readouterr()
    # the same refusals for both tasks
    assert main(_argv(task, cut, epochs, shapes)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", str(cut)]) == 2
    assert f"already finished {epochs} of {epochs} epochs" in capsys.readouterr().err


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path, capsys):
    from moecnn.train.runs import run_lock

    run = tmp_path / "run"
    with run_lock(run):  # what a training process holds for its whole life
        rc = main(_argv("classification", run, 1, tmp_path))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "is in use by moecnn pid" in err[0], err
        assert not (run / "config.yaml").exists()
    assert main(_argv("classification", run, 1, tmp_path)) == 0  # released


def _ddp_worker(rank, world, port, argv, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from moecnn.train import distributed
    from moecnn.train.loop import run

    try:
        final, model = run(load_config(argv[0], argv[1]), argv[2])
        torch.save({"state": model.state_dict(), "final": final}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_detection_under_ddp_gloo(tmp_path):
    """Two gloo ranks train the detector: identical parameters on both, one run directory, global routing log."""
    import torch.multiprocessing as mp

    overrides = DET + [f"data.shapes.out={tmp_path / 'shapes'}", "train.epochs=1", "optim.batch_size=8"]
    run_dir = tmp_path / "run"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), ("detection_shapes", overrides, str(run_dir)),
                                          str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    a = torch.load(tmp_path / "rank0.pt", weights_only=False)
    b = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert a["final"] == b["final"] and a["final"]["val"]["num_images"] == 4
    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    r = rec["routing"]["head.classification_head.moe@P3"]["routed"]
    assert abs(sum(r) - 2) < 1e-4  # k = 2 of the images of both ranks
    assert json.loads((run_dir / "meta.json").read_text())["world_size"] == 2


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three colour classes, 40×40 PNGs, train/ and test/ (the layout data.name=image_folder reads)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 6)):
        for c, col in (("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                a = (rng.normal(0, 30, (40, 40, 3)) + np.array(col)).clip(0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("source,name,targets", [
    ("timm", "mobilenetv3_small_050", "blocks.4.*"),
    ("torchvision", "resnet18", "layer4.1"),
], ids=["timm", "torchvision"])
def test_any_model_on_an_image_folder_end_to_end(source, name, targets, image_folder, tmp_path):
    """model.source/name/targets from the command line; eval, analyze and report read the run like any other."""
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), f"model.source={source}", f"model.name={name}", f"model.targets=[{targets}]",
            "model.num_experts=3", "model.k=2", "model.small_input=true", "data.name=image_folder",
            f"data.root={image_folder}", "data.image_size=32", "data.val_size=9", "train.epochs=1",
            "optim.batch_size=13", "log.tensorboard=false", "log.progress=none", "train.device=cpu", "train.threads=1"]
    assert main(argv) == 0
    cfg = load_config(base=__import__("omegaconf").OmegaConf.load(run / "config.yaml"))
    assert cfg.model.source == source and cfg.model.moe == "none"  # the default preset's placement was dropped
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    layers = list(rec["routing"])
    assert layers and all(n.startswith(targets.rstrip(".*")) for n in layers)
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    z = np.load(run / "eval" / "routing_test.npz")
    assert list(z["layers"]) == layers and len(z["labels"]) == 18
    assert main(["analyze", str(run), "--max-tsne", "18", "--n-perm", "20"]) == 0
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert set(summary["per_layer"]) == set(layers)
    assert main(["report", str(run)]) == 0 and "data:image/png;base64," in (run / "report.html").read_text()


def test_upcycling_equals_the_dense_model_at_step_zero(tmp_path):
    """init_from loads dense weights, then targets become MoEs of exact copies: the output is the dense output."""
    from moecnn.models import ModelConfig, build_classifier

    torch.manual_seed(0)
    dense = build_classifier(ModelConfig(name="resnet10_tiny", width=8), num_classes=5)
    path = tmp_path / "dense.pt"
    torch.save(dense.state_dict(), path)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        ref = dense.eval()(x)
    for targets, src, name in ((["layer4"], "moecnn", "resnet10_tiny"), (["layer3.0", "layer4.*"], "moecnn",
                                                                            "resnet10_tiny")):
        moe = build_classifier(ModelConfig(source=src, name=name, width=8, targets=targets, init="copy",
                                           num_experts=4, k=2, init_from=str(path)), num_classes=5).eval()
        assert len(__import__("moecnn").moe_layers(moe)) == len(targets)
        with torch.no_grad():
            assert torch.allclose(moe(x), ref, atol=1e-5)
    # a torchvision model from a locally saved state dict (the download-free path users take with their own files)
    import torchvision

    tv = torchvision.models.resnet18(num_classes=5)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    moe = build_classifier(ModelConfig(source="torchvision", name="resnet18", targets=["layer4.1"], init="copy",
                                       init_from=str(tmp_path / "tv.pth")), num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(moe(x), tv.eval()(x), atol=1e-5)
    with pytest.raises(ValueError, match="init_from_ignore"):
        build_classifier(ModelConfig(source="torchvision", name="resnet18", init_from=str(tmp_path / "tv.pth")),
                         num_classes=7)
    ok = build_classifier(ModelConfig(source="torchvision", name="resnet18", init_from=str(tmp_path / "tv.pth"),
                                      init_from_ignore=["fc.*"]), num_classes=7)
    assert torch.equal(ok.conv1.weight, tv.conv1.weight)


def test_upcycling_from_a_dense_run_through_the_engine(tmp_path):
    dense = tmp_path / "dense"
    train(load_config("tiny", CLS + ["model.moe=none", "train.epochs=1"]), dense)
    up = load_config("tiny", CLS + ["model.moe=none", "model.targets=[layer4]", "model.init=copy_noise",
                                    f"model.init_from={dense}", "train.epochs=1"])
    from moecnn.tasks.classification import Classification

    task = Classification(up, tmp_path)
    task.setup()
    model = task.build_model()
    ck = torch.load(dense / "checkpoint.pt", weights_only=True)["model"]
    assert torch.equal(model.stem[0].weight, ck["stem.0.weight"])
    e0, e1 = model.layer4.experts[0], model.layer4.experts[1]
    w0, w1 = e0[0].conv1.weight, e1[0].conv1.weight
    assert not torch.equal(w0, w1) and torch.allclose(w0, ck["layer4.0.conv1.weight"], atol=0.1)  # copies + noise
    final = train(up, tmp_path / "up")
    assert final["test"]["top1"] >= 0


@pytest.mark.slow
def test_two_torchrun_nodes_on_one_machine(tmp_path):
    """`torchrun --nnodes 2`: two node processes (one rank each) meet on localhost over gloo; one run directory."""
    port = _free_port()
    run = tmp_path / "run"
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--master_addr", "127.0.0.1", "--master_port", str(port)]
    train_args = ["-m", "moecnn.cli", *_argv("classification", run, 1, tmp_path), "log.progress=none"]
    procs = [subprocess.Popen(common + ["--node_rank", str(r)] + train_args, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert json.loads((run / "meta.json").read_text())["world_size"] == 2
    assert json.loads((run / "final.json").read_text())["test"]["images"] == 64


# --------------------------------------------------------------------------------------------- never mislead
@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A classification run stopped after 1 of 2 epochs."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    train(load_config("tiny", CLS + ["train.epochs=2", "train.stop_after_epochs=1"]), run)
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(run, d)
    return d


def test_torn_last_metrics_line_is_tolerated_and_a_corrupt_meta_is_named(stopped, tmp_path, capsys):
    d = _copy(stopped, tmp_path)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "lr": 0.0')  # what a kill during the append leaves
    assert main(["train", "--resume", str(d)]) == 0
    assert [json.loads(x)["epoch"] for x in (d / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    d2 = tmp_path / "copy2"
    import shutil

    shutil.copytree(stopped, d2)
    (d2 / "meta.json").write_text('{"seed": 0,')
    capsys.readouterr()
    assert main(["train", "--resume", str(d2)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meta.json" in err[0] and "corrupt" in err[0], err


def test_bad_run_files_and_values_are_one_line(stopped, tmp_path, capsys, monkeypatch):
    d = _copy(stopped, tmp_path)
    (d / "config.yaml").write_text("")
    assert main(["train", "--resume", str(d)]) == 2
    assert "config.yaml' is empty" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "data.val_size=-1"]) == 2
    assert "data.val_size must be >= 0" in capsys.readouterr().err
    # a failed checkpoint save names the file and says that the previous one is kept
    import moecnn.train.runs as runs

    def full_disk(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:747] . unexpected pos 64 vs 0")

    monkeypatch.setattr(runs.torch, "save", full_disk)
    assert main(_argv("classification", tmp_path / "y", 1, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "could not write" in err and "checkpoint.pt" in err and "previous file" in err, err


def test_interrupted_eval_does_not_suggest_resuming_training(monkeypatch, capsys, tmp_path):
    import importlib

    ev = importlib.import_module("moecnn.train.evaluate")  # the module (the package exports a function of that name)

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "run_eval", stop)
    assert main(["eval", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err


def test_nonfinite_first_epoch_and_divergence_are_reported_truthfully(tmp_path, capsys, monkeypatch):
    import moecnn.tasks.classification as cls

    real = cls.aux_loss

    def nan_aux(model):
        total, terms = real(model)
        return total * float("nan"), {k: v * float("nan") for k, v in terms.items()}

    monkeypatch.setattr(cls, "aux_loss", nan_aux)
    assert main(_argv("classification", tmp_path / "nan", 1, tmp_path) + ["log.check_every=1"]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 0" in err and "no checkpoint was written yet" in err
    assert "last good checkpoint" not in err
    monkeypatch.setattr(cls, "aux_loss", real)
    # a diverging run (Adam at lr 1e6): finite but useless losses get a warning in the log and metrics.jsonl
    run = tmp_path / "div"
    rc = main(_argv("classification", run, 3, tmp_path) + ["optim.lr=1e6", "optim.schedule=constant",
                                                           "model.moe=none"])
    out = capsys.readouterr()
    if rc == 0:
        warned = [w for x in (run / "metrics.jsonl").read_text().splitlines() for w in json.loads(x)["warnings"]]
        assert any("diverging" in w for w in warned), out.out
        assert "warning: training is diverging" in out.out
    else:  # overflowed to inf/NaN: then the non-finite error says so
        assert "non-finite loss" in out.err


def test_optional_packages_are_checked_before_training(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    assert main(["train", "--out", str(tmp_path / "t"), "model.source=timm", "model.name=resnet10t"]) == 2
    assert 'pip install "moecnn[timm]"' in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_provenance_names_moecnn_not_an_enclosing_repository(tmp_path, monkeypatch):
    """meta.json records the package version and a hash of its source; a git commit only from moecnn's own
    repository (a copy inside an unrelated repository gets none)."""
    import shutil

    import moecnn
    from moecnn.train import runs

    info = runs.provenance()
    assert info["moecnn"] == moecnn.__version__ and len(info["source_sha256"]) == 16
    outer = tmp_path / "outer"
    pkg = outer / "vendor" / "moecnn"
    shutil.copytree(Path(moecnn.__file__).parent, pkg)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-C", str(outer), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x"],
                   check=True)
    code = "import sys; sys.path.insert(0, sys.argv[1]); from moecnn.train import runs; print(runs.git_commit())"
    out = subprocess.run([sys.executable, "-c", code, str(outer / "vendor")], capture_output=True, text=True,
                         env=_env())
    assert out.stdout.strip() == "None", out.stderr[-500:]


def test_eval_results_of_an_earlier_checkpoint_are_not_reported(stopped, tmp_path, capsys):
    """train 1 epoch → eval → --resume to 2 epochs: the eval files name the old checkpoint, so moecnn table
    reports final.json's number instead of the stale one (the analyses check the same fingerprint)."""
    from moecnn.train.runs import checkpoint_path, fingerprint, is_current

    d = _copy(stopped, tmp_path)
    assert main(["eval", str(d), "--device", "cpu"]) == 0
    old = json.loads((d / "eval" / "test.json").read_text())
    assert old["checkpoint_sha256"] == fingerprint(checkpoint_path(d)) and is_current(d, old)
    assert main(["train", "--resume", str(d)]) == 0
    assert not is_current(d, old)
    capsys.readouterr()
    assert main(["table", str(d), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    final = json.loads((d / "final.json").read_text())
    assert row["test_top1"] == pytest.approx(final["test"]["top1"]) and row.get("stale_eval") and not row["k_sweep"]


def test_report_after_resume_uses_the_new_checkpoint(stopped, tmp_path):
    """train 1 epoch → eval → analyze → --resume → report: the report's accuracy is the resumed model's (final.json),
    not the stale eval of the first epoch; the stale files are named in the notes."""
    from moecnn.analysis import report

    d = _copy(stopped, tmp_path)
    assert main(["eval", str(d), "--device", "cpu"]) == 0
    assert main(["analyze", str(d), "--max-tsne", "30", "--n-perm", "20"]) == 0
    old = json.loads((d / "analysis" / "summary.json").read_text())
    assert old["accuracy"]["default"]["top1"] == pytest.approx(json.loads((d / "eval" / "test.json").read_text())["top1"])
    assert main(["train", "--resume", str(d)]) == 0
    report(d)
    new = json.loads((d / "analysis" / "summary.json").read_text())
    final = json.loads((d / "final.json").read_text())
    assert new["checkpoint"] != old["checkpoint"]
    assert new["accuracy"]["default"]["top1"] == pytest.approx(final["test"]["top1"], abs=1e-6)
    assert any("earlier checkpoint" in n for n in new["notes"])
    assert "routing_test.npz" not in new["sources"]["routing"] or "analysis" in new["sources"]["routing"]


def test_review_fixes_detection_targets_legacy_checkpoints_configs(tmp_path):
    """MoE layers added with model.targets to a detector add their balancing terms to the loss; checkpoints in
    the former stacked layout load through load_model_state; 0.1 detection configs with 0/null values load;
    train.stop_after_epochs=0 writes the run's config and stops before training; timm names with a tag build."""
    over = DET + [f"data.shapes.out={tmp_path / 'shapes'}", "train.epochs=1", "model.targets=[backbone.body.layer4.0]",
                  "model.num_experts=2", "model.k=1"]
    train(load_config("detection_shapes", over), tmp_path / "det")
    rec = json.loads((tmp_path / "det" / "metrics.jsonl").read_text().splitlines()[0])
    assert "loss/backbone.body.layer4.0/kl" in rec["train"] and "loss/aux" in rec["train"]
    assert "backbone.body.layer4.0" in rec["routing"]

    from moecnn.models import ModelConfig, build_classifier
    from moecnn.train.runs import load_model_state

    cfg = ModelConfig(name="resnet10_tiny", width=8, moe="resblock", num_experts=3, k=2, stacked=True)
    torch.manual_seed(0)
    a = build_classifier(cfg, num_classes=5).eval()
    sd = a.state_dict()
    legacy = {k: v for k, v in sd.items() if ".experts." not in k}
    for k, v in sd.items():  # the former layout: experts.net.<path>, tensors concatenated over the experts
        if ".experts.0." in k:
            rest = k.split(".experts.0.", 1)
            parts = [sd[f"{rest[0]}.experts.{e}.{rest[1]}"] for e in range(3)]
            legacy[f"{rest[0]}.experts.net.{rest[1]}"] = parts[0] if v.dim() == 0 else torch.cat(parts)
    b = build_classifier(cfg, num_classes=5).eval()
    load_model_state(b, legacy, tmp_path / "old.pt")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x))

    old = tmp_path / "old.yaml"
    old.write_text("task: detection\nmodel: {balance: null}\noptim: {epochs: 6}\nlog: {print_every: 0, eval_every: 0}\n")
    c = load_config(str(old))
    assert c.model.balance == "none" and c.train.eval_every == 6 and c.log.check_every == 50

    r = train(load_config("tiny", CLS + ["train.epochs=2", "train.stop_after_epochs=0"]), tmp_path / "zero")
    assert r["stopped_after_epoch"] == -1 and (tmp_path / "zero" / "config.yaml").is_file()
    assert not (tmp_path / "zero" / "checkpoint.pt").exists()

    from moecnn.models.builder import timm_source

    assert timm_source("resnet10t.c3_in1k", 7, 3, ModelConfig()).fc.out_features == 7
