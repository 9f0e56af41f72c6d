"""`moecnn table`: numbers read from run directories, per run and grouped over seeds."""
from __future__ import annotations

import json

import pytest
import yaml

from moecnn.cli import main
from moecnn.train.table import find_runs, format_table, group_rows, run_row, table


def _run(root, name, seed, top1, times, *, k_sweep=None, tta=None, nmi=None, final_only=False, epochs=3):
    d = root / name
    (d / "eval").mkdir(parents=True)
    (d / "analysis").mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump({"model": {"moe": "resblock"}, "train": {"seed": seed,
                                                                                              "epochs": epochs}}))
    lines = [{"epoch": i, "time_s": t, "images_per_s": 1000.0 / t} for i, t in enumerate(times)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (d / "final.json").write_text(json.dumps({"test": {"top1": top1 - 0.01 if not final_only else top1}}))
    if not final_only:
        (d / "eval" / "test.json").write_text(json.dumps({"top1": top1}))
    if k_sweep:
        results = {str(k): {"top1": v} for k, v in k_sweep.items()}
        (d / "eval" / "k_sweep.json").write_text(json.dumps({"results": results}))
    if tta is not None:
        (d / "eval" / "test_tta_flip.json").write_text(json.dumps({"top1": tta}))
    if nmi is not None:
        head = {"layer4.moe": {"nmi_superclass": nmi, "nmi_superclass_null_max": 0.002}, "_accuracy": {"top1": top1}}
        (d / "analysis" / "summary.json").write_text(json.dumps({"headline": head}))
    return d


def test_run_row_reads_every_number(tmp_path):
    d = _run(tmp_path, "a", 0, 77.2, [30.0, 1.0, 2.0], k_sweep={1: 76.0, 2: 77.2}, tta=77.8, nmi=0.3)
    r = run_row(d)
    assert r["epochs"] == "3/3" and r["test_top1"] == 77.2  # eval's number, not final.json's
    assert r["train_s"] == 33.0 and r["median_epoch_s"] == 2.0 and r["first_epoch_s"] == 30.0
    assert r["images_per_s"] == 500.0 and r["k_sweep"] == {1: 76.0, 2: 77.2}
    assert r["tta_flip"] == 77.8 and r["nmi_superclass"] == 0.3 and r["nmi_null_max"] == 0.002
    cut = run_row(_run(tmp_path, "b", 0, 70.0, [1.0], final_only=True, epochs=5))
    assert cut["epochs"] == "1/5" and cut["test_top1"] == 70.0 and cut["tta_flip"] is None and cut["k_sweep"] is None
    md = format_table([r])
    assert "| a | 3/3 | 77.20 | 76.00 / 77.20 | 77.80 | 0.300 | 0.0020 | 33.0 | 2.000 | 500 | 30.0 |" in md


def test_grouping_over_seeds_gives_mean_and_sample_std(tmp_path):
    for seed, top1 in ((0, 77.0), (1, 77.5), (2, 78.0)):
        _run(tmp_path / "runs", f"s{seed}", seed, top1, [1.0, 1.0, 1.0], k_sweep={1: top1 - 1, 2: top1}, nmi=0.3)
    _run(tmp_path / "runs", "other", 0, 70.0, [1.0, 1.0, 1.0], epochs=9)  # another config: its own row
    runs = find_runs([tmp_path / "runs"])
    assert [r.name for r in runs] == ["other", "s0", "s1", "s2"]
    groups = group_rows([run_row(r) for r in runs])
    assert len(groups) == 2
    g = next(x for x in groups if x["seeds"] == [0, 1, 2])
    assert g["test_top1"]["mean"] == pytest.approx(77.5) and g["test_top1"]["std"] == pytest.approx(0.5)
    assert g["test_top1"]["n"] == 3 and g["k_sweep"] == {1: pytest.approx(76.5), 2: pytest.approx(77.5)}
    assert "77.50 ± 0.50 (n=3)" in format_table(groups)
    rows = json.loads(table([tmp_path / "runs"], group=True, fmt="json"))
    assert len(rows) == 2 and all("config" not in r for r in rows)
    csv_text = table([tmp_path / "runs"], fmt="csv")
    assert csv_text.splitlines()[0].startswith("run,epochs,test_top1") and len(csv_text.splitlines()) == 5


def test_cli_table_and_its_errors(tmp_path, capsys):
    _run(tmp_path, "a", 0, 77.2, [1.0])
    out = tmp_path / "t.md"
    assert main(["table", str(tmp_path / "a"), "--out", str(out)]) == 0
    assert "| a | 1/3 | 77.20 |" in capsys.readouterr().out and "| a | 1/3 | 77.20 |" in out.read_text()
    assert main(["table", str(tmp_path / "nothing")]) == 2
    assert "no run directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown table format"):
        format_table([], "xml")
