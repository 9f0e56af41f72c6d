"""Sharing: moecnn export → model.safetensors + config + model card; from_pretrained; the Hub mixin on local
folders (no network); eval/analyze/report on an exported folder."""
from __future__ import annotations

import json

import pytest
import torch

import moecnn
from moecnn.cli import main
from moecnn.train import load_run

TINY = ["data.image_size=16", "data.synthetic_train_size=160", "data.val_size=32", "data.synthetic_test_size=32",
        "model.width=8", "optim.batch_size=32", "train.epochs=1", "log.tensorboard=false", "log.progress=none",
        "train.device=cpu", "train.threads=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp") / "run"
    assert main(["train", "--out", str(d), *TINY]) == 0
    assert main(["eval", str(d), "--device", "cpu"]) == 0
    assert main(["analyze", str(d), "--max-tsne", "32", "--n-perm", "20"]) == 0
    return d


def test_export_files_card_and_from_pretrained(run, tmp_path, capsys):
    out = tmp_path / "shared"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.yaml", "config.json", "moecnn.json",
                                               "README.md"}
    from safetensors.torch import load_file

    model, _, _ = load_run(run)
    sd = load_file(str(out / "model.safetensors"))
    assert sd.keys() == model.state_dict().keys()
    shared = moecnn.from_pretrained(out)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(shared(x), model(x))
        with moecnn.routing_override(shared, k=1):
            assert shared(x).shape == (5, 10)
    info = json.loads((out / "moecnn.json").read_text())
    assert info["data"]["num_classes"] == 10 and len(info["checkpoint_sha256"]) == 16
    card = (out / "README.md").read_text()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    for k, v in summary["k_sweep"].items():
        assert f"k={k}: {v['top1']:.2f}" in card
    head = json.loads((run / "analysis" / "summary.json").read_text())["headline"]["layer4.moe"]
    assert f"NMI(top-1 expert, superclass) {head['nmi_superclass']:.3f}" in card
    assert head["top"][0] in card and "moecnn train --out" in card
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out)]) == 2  # never into a non-empty folder
    assert "not empty" in capsys.readouterr().err


def test_hub_mixin_roundtrip_on_local_folders(run, tmp_path, monkeypatch, capsys):
    from moecnn.export import Pretrained, export_run

    out = export_run(run, tmp_path / "a")
    p = Pretrained.from_pretrained(str(out))
    p.save_pretrained(tmp_path / "b")
    q = Pretrained.from_pretrained(str(tmp_path / "b"))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(p.model(x), q.model(x))
    assert q.info["checkpoint_sha256"] == p.info["checkpoint_sha256"]
    pushed = {}
    monkeypatch.setattr(Pretrained, "push_to_hub", lambda self, repo_id, **kw: pushed.setdefault("id", repo_id))
    assert main(["export", str(run), "--out", str(tmp_path / "c"), "--push-to-hub", "me/tiny-moe"]) == 0
    assert pushed["id"] == "me/tiny-moe"
    with pytest.raises(FileNotFoundError, match="not an exported moecnn model"):
        moecnn.from_pretrained(run)  # a run directory is not an exported folder


def test_eval_analyze_report_accept_an_exported_folder(run, tmp_path):
    from moecnn.export import export_run

    out = export_run(run, tmp_path / "shared")
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "eval" / "test.json").read_text())["top1"] == pytest.approx(
        json.loads((run / "eval" / "test.json").read_text())["top1"])
    assert main(["analyze", str(out), "--max-tsne", "32", "--n-perm", "20"]) == 0
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()
