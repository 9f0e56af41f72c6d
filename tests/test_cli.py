"""The moecnn CLI: help, presets, config errors as one-line messages (exit 2), eval errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from moecnn.cli import main
from moecnn.train import load_config
from moecnn.train.config import expand_preset, preset_names

TINY = [
    "data.image_size=16", "data.synthetic_train_size=160", "data.val_size=32", "data.synthetic_test_size=32",
    "model.width=8", "optim.batch_size=64", "train.epochs=1", "log.tensorboard=false", "log.progress=lines",
    "train.device=cpu", "train.threads=1",
]


def one_error(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert match in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("verb", ["train", "eval", "presets", "analyze", "report", "data", "info"])
def test_help_of_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: moecnn" in capsys.readouterr().out


def test_top_level_help_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "moecnn.cli", "--help"], capture_output=True, text=True).stdout
    for verb in ("train", "eval", "presets", "analyze", "report", "data", "info"):
        assert verb in out


def test_presets_list_and_grid(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "paper_baseline", "paper_moe", "fast_moe", "fast_baseline", "paper_moe_p1_n10_mean"):
        assert name in out
    grid = [n for n in preset_names() if n.startswith("paper_moe_p")]
    assert len(grid) == 32
    c = load_config("paper_moe_p2_n10_relative")
    assert (c.model.position, c.model.num_experts, c.model.balance) == (2, 10, "relative")
    assert c.optim.milestones == [81, 120] and c.optim.batch_size == 128 and c.data.augment.color_jitter == 0.3
    f = load_config("fast_moe_p3_n4_importance")
    assert f.optim.name == "sgd" and f.model.position == 3
    path, extra = expand_preset("paper_moe_p4_n4_kl")
    assert path.name == "paper_moe.yaml" and "model.balance=kl" in extra
    assert main(["presets", "--show", "paper_baseline"]) == 0
    assert "milestones" in capsys.readouterr().out


def test_every_preset_resolves(capsys):
    from moecnn.train.config import peek_task

    for name in preset_names():
        if peek_task(name) == "detection":
            assert main(["presets", "--show", name]) == 0
            assert "task: detection" in capsys.readouterr().out
        else:
            assert load_config(name).task == "classification"


def test_config_errors_are_one_line(capsys, tmp_path):
    out = ["--out", str(tmp_path / "x")]
    one_error(capsys, ["train", "--config", "nope", *out], "unknown preset 'nope'")
    e = one_error(capsys, ["train", *out, "optim.lrr=0.1"], "unknown config key 'optim.lrr'")
    assert "optim.lr" in e
    one_error(capsys, ["train", *out, "optim.lr=abc"], "optim.lr expects float, got 'abc'")
    one_error(capsys, ["train", *out, "train.epochs=1.5"], "train.epochs expects int")
    one_error(capsys, ["train", *out, "model.k=5"], "model.k=5 must be between 1 and model.num_experts=4")
    one_error(capsys, ["train", *out, "data.augment.cutout=-8"], "data.augment.cutout must be >= 0 (0 = off), got -8")
    one_error(capsys, ["train", *out, "nokey"], "must look like key=value")
    one_error(capsys, ["train", *out, "foo=1"], "unknown config key 'foo'")
    one_error(capsys, ["train", "--config", str(tmp_path / "missing.yaml"), *out], "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    one_error(capsys, ["train", "--config", str(bad), *out], "cannot parse config")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  num_expert: 4\n")
    one_error(capsys, ["train", "--config", str(typo), *out], "unknown config key 'model.num_expert'")


def test_missing_data_is_one_line(capsys, tmp_path):
    one_error(capsys, ["train", "--out", str(tmp_path / "m"), "data.name=cifar100", f"data.root={tmp_path}/none",
                       "train.device=cpu", "log.tensorboard=false"], "error: ")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(d), *TINY]) == 0
    return d


def test_train_prints_where_results_are(run_dir, capsys, tmp_path):
    assert (run_dir / "final.json").is_file()
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.model.width == 8 and cfg.task == "classification" and "log" in cfg  # resolved, every key
    one_error(capsys, ["train", "--out", str(run_dir), *TINY], "already holds a run")
    one_error(capsys, ["train", "--resume", str(run_dir)], "already finished")


def test_table_of_a_trained_run(run_dir, capsys):
    """`moecnn table` on a real run: the test top-1 is final.json's, the epochs and time are metrics.jsonl's."""
    import json

    final = json.loads((run_dir / "final.json").read_text())
    times = [json.loads(x)["time_s"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert main(["table", str(run_dir), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["run"] == "run" and row["epochs"] == f"{len(times)}/{len(times)}"
    assert row["test_top1"] == pytest.approx(final["test"]["top1"]) and row["train_s"] == pytest.approx(sum(times))


def test_eval_errors(run_dir, capsys, tmp_path):
    one_error(capsys, ["eval", str(run_dir), "--k", "7", "--device", "cpu"], "k must satisfy")
    one_error(capsys, ["eval", str(run_dir), "--force-expert", "9", "--device", "cpu"], "cannot force expert 9")
    one_error(capsys, ["eval", str(tmp_path / "nothing")], "not a run directory")
    assert main(["eval", str(run_dir), "--k", "1", "--device", "cpu"]) == 0
    assert (run_dir / "eval" / "custom_k1.json").is_file()
    assert main(["eval", str(run_dir), "--disable-experts", "0,1", "--device", "cpu"]) == 0


def test_corrupt_and_mismatched_checkpoints(run_dir, capsys, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    data = (bad / "checkpoint.pt").read_bytes()
    (bad / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    one_error(capsys, ["eval", str(bad), "--device", "cpu"], "corrupt or truncated")
    one_error(capsys, ["train", "--resume", str(bad), "train.epochs=3"], "corrupt or truncated")
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    cfg = OmegaConf.load(other / "config.yaml")
    cfg.model.num_experts = 6
    OmegaConf.save(cfg, other / "config.yaml")
    one_error(capsys, ["eval", str(other), "--device", "cpu"], "does not match the model")
    (other / "checkpoint.pt").unlink()
    one_error(capsys, ["eval", str(other), "--device", "cpu"], "not found")
    foreign = tmp_path / "foreign"
    shutil.copytree(run_dir, foreign)
    torch.save({"weights": 1}, foreign / "checkpoint.pt")
    one_error(capsys, ["eval", str(foreign), "--device", "cpu"], "not a moecnn checkpoint")


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "gap_fc" in out


def test_detection_config_errors_and_legacy_keys(capsys, tmp_path):
    """Detection configs go through the same schema: unknown keys and bad values are one line; a config of
    moecnn 0.1 (detection keys of its own loop) is read in today's keys."""
    one_error(capsys, ["train", "--config", "detection_shapes", "optim.lrr=1"], "unknown config key 'optim.lrr'")
    one_error(capsys, ["train", "--config", "detection_shapes", "model.routing=pixel"], "model.routing must be")
    one_error(capsys, ["train", "--config", "detection_shapes", "--out", str(tmp_path / "p"), "model.packed=true"],
              "model.packed=true needs head towers without normalisation")
    assert not (tmp_path / "p").exists()
    one_error(capsys, ["eval", str(tmp_path), "--batch-size", "0"], "--batch-size must be >= 1, got 0")
    one_error(capsys, ["eval", str(tmp_path), "--batch-size", "-5"], "--batch-size must be >= 1, got -5")
    old = tmp_path / "old.yaml"
    old.write_text("task: detection\nname: x\nseed: 3\ndevice: cpu\noptim: {optimizer: sgd, epochs: 5, bf16: true, "
                   "schedule: none, warmup_iters: 10}\nlog: {print_every: 7, final_sweep: true}\n"
                   "model: {expert_noise: 0.02}\n")
    c = load_config(str(old))
    assert (c.train.seed, c.train.device, c.optim.name, c.train.epochs, c.train.precision) == (3, "cpu", "sgd", 5, "bf16")
    assert c.optim.schedule == "constant" and c.log.check_every == 7 and c.model.init_noise == 0.02
    assert load_config("tiny", ["optim.label_smoothing=0.2"]).model.label_smoothing == 0.2  # moved key


def test_preset_name_not_shadowed_by_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert load_config("tiny").model.name == "resnet10_tiny"
