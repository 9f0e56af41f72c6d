"""No file runs code: crafted checkpoints, weights files and CIFAR pickles are refused with one line, and the
payload they carry never runs (a marker file it would create stays absent)."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moecnn.cli import main
from moecnn.safeio import UnsafeFileError, load_pickle, read_state_dict, torch_load

TINY = ["data.image_size=16", "data.synthetic_train_size=96", "data.val_size=32", "data.synthetic_test_size=32",
        "model.width=8", "model.name=resnet10_tiny", "optim.batch_size=32", "train.epochs=1",
        "log.tensorboard=false", "log.progress=none", "train.device=cpu", "train.threads=1"]


class Payload:
    """Unpickling this object would create ``marker`` (what an attacker's code would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_checkpoint(path: Path, marker: Path) -> None:
    ck = torch.load(path, weights_only=True) if path.exists() else {"model": {}}
    ck["evil"] = Payload(marker)
    torch.save(ck, path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("safe") / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    return out


def _one_line(capsys, argv, marker: Path, match: str = "refusing to load") -> str:
    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "%|" not in ln]  # progress bars aside
    assert not marker.exists(), "the payload ran"
    assert rc == 2 and len(err) == 1 and match in err[0], err
    return err[0]


def test_checkpoints_written_by_moecnn_load_with_weights_only(run):
    ck = torch.load(run / "checkpoint.pt", weights_only=True)  # no extra allowed globals
    assert {"model", "optimizer", "rng", "epoch"} <= set(ck)
    torch.load(run / "best.pt", weights_only=True)


@pytest.mark.parametrize("verb", ["eval", "eval_which", "resume", "analyze"])
def test_crafted_checkpoint_never_runs(run, tmp_path, capsys, verb):
    d = tmp_path / "run"
    shutil.copytree(run, d)
    marker = tmp_path / "PWNED"
    plant_checkpoint(d / "checkpoint.pt", marker)
    if verb == "eval":
        argv = ["eval", str(d), "--device", "cpu"]
    elif verb == "eval_which":
        evil = tmp_path / "other.pt"
        shutil.copy(d / "checkpoint.pt", evil)
        argv = ["eval", str(d), "--which", str(evil), "--device", "cpu"]
    elif verb == "resume":
        argv = ["train", "--resume", str(d), "train.epochs=2"]
    else:
        argv = ["analyze", str(d), "--device", "cpu"]
    line = _one_line(capsys, argv, marker)
    assert "checkpoint.pt" in line or "other.pt" in line


def test_crafted_weights_file_for_a_detector(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Payload(marker)}, evil)
    with pytest.raises(UnsafeFileError, match="weights.pth"):
        read_state_dict(evil)
    from moecnn.models.retinanet import _read_state_dict

    with pytest.raises(UnsafeFileError):
        _read_state_dict(str(evil))
    assert not marker.exists()


def test_random_bytes_are_a_corrupt_file_not_a_traceback(tmp_path):
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(RuntimeError, match="corrupt"):
        torch_load(p)


def test_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.arange(3.0)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["a"], torch.arange(3.0))


def _cifar_pickle(path: Path, extra=None, protocol: int = 2) -> None:
    d = {b"data": np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072),
         b"fine_labels": [3, 7], b"coarse_labels": [1, 0], b"filenames": [b"a.png", b"b.png"], b"batch_label": b"t"}
    if extra is not None:
        d[b"extra"] = extra
    path.write_bytes(pickle.dumps(d, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, 4])
def test_official_cifar_pickle_format_loads(tmp_path, protocol):
    _cifar_pickle(tmp_path / "test", protocol=protocol)
    d = load_pickle(tmp_path / "test")
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (2, 3072) and d[b"fine_labels"] == [3, 7]


def test_crafted_cifar_pickle_never_runs(tmp_path):
    from moecnn.data import build_data
    from moecnn.data.config import DataConfig

    marker = tmp_path / "PWNED"
    root = tmp_path / "cifar100" / "cifar-100-python"
    root.mkdir(parents=True)
    _cifar_pickle(root / "train", extra=Payload(marker))
    _cifar_pickle(root / "test")
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)],
                                              b"coarse_label_names": [b"s%d" % i for i in range(20)]}, protocol=2))
    with pytest.raises(UnsafeFileError, match="refusing to unpickle .*train.*open"):
        build_data(DataConfig(name="cifar100", root=str(tmp_path / "cifar100"), val_size=0))
    assert not marker.exists()
