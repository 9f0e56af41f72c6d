"""`moecnn compare`: agreement between the expert partitions of runs evaluated on the same images."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moecnn.analysis.compare import compare_pair, compare_runs, format_comparison
from moecnn.cli import main


def _routing(d, top1, labels, superlabels, n_experts=4):
    """An eval/routing_test.npz whose top-1 experts are ``top1`` (k = 2 weights, like the loop writes)."""
    m = len(top1)
    w = np.zeros((m, n_experts), np.float32)
    w[np.arange(m), top1] = 0.7
    w[np.arange(m), (top1 + 1) % n_experts] = 0.3
    (d / "eval").mkdir(parents=True)
    np.savez(d / "eval" / "routing_test.npz", labels=labels, superlabels=superlabels, layers=np.array(["l4.moe"]),
             **{"l4.moe/weights": w, "l4.moe/logits": np.log(w + 1e-6)},
             superclass_names=np.array(["animals", "plants", "scenes", "objects"]))
    return d


def test_relabelled_experts_are_matched_and_agreement_counts_the_noise():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, 2000)
    perm = np.array([2, 0, 3, 1])
    b = perm[a]
    flip = rng.random(2000) < 0.1  # 10 % of the images go to a random expert
    b[flip] = rng.integers(0, 4, flip.sum())
    r = compare_pair(a, b, superlabels=a, superclass_names=["w", "x", "y", "z"], n_perm=50)
    assert {(p["a"], p["b"]) for p in r["pairs"]} == {(i, int(perm[i])) for i in range(4)}
    expected = 1 - flip.mean() * 3 / 4  # a random expert is the matched one a quarter of the time
    assert r["matched_agreement"] == pytest.approx(expected, abs=0.005)
    assert r["nmi"] > 0.6 and r["ari"] > 0.7 and r["nmi_p"] == pytest.approx(1 / 51) and r["nmi_null_max"] < 0.01
    assert r["pairs"][0]["top_a"][0] == "w" and sum(sum(row) for row in r["contingency"]) == 2000
    indep = compare_pair(a, rng.integers(0, 4, 2000), n_perm=50)
    assert indep["nmi_p"] > 0.05 and abs(indep["ari"]) < 0.01 and indep["matched_agreement"] < 0.3
    with pytest.raises(ValueError, match="one length"):
        compare_pair(a, a[:10])


def test_compare_runs_and_cli(tmp_path, capsys):
    rng = np.random.default_rng(1)
    labels, sup = rng.integers(0, 10, 500), rng.integers(0, 4, 500)
    top = rng.integers(0, 4, 500)
    _routing(tmp_path / "a", top, labels, sup)
    _routing(tmp_path / "b", (top + 1) % 4, labels, sup)  # the same partition, other expert ids
    _routing(tmp_path / "c", rng.integers(0, 4, 500), labels, sup)
    res = compare_runs([tmp_path / "a", tmp_path / "b", tmp_path / "c"], n_perm=20)
    assert res["layer"] == "l4.moe" and res["n_images"] == 500 and len(res["pairs"]) == 3
    ab = res["pairs"][0]
    assert ab["matched_agreement"] == 1.0 and ab["nmi"] == pytest.approx(1.0) and ab["ari"] == pytest.approx(1.0)
    assert res["pairs"][1]["matched_agreement"] < 0.5
    assert "| a | b | 1.000" in format_comparison(res)
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--n-perm", "10", "--out", str(out)]) == 0
    assert "expert 0 ↔ expert 1 (100 % / 100 %" in capsys.readouterr().out
    assert json.loads(out.read_text())["pairs"][0]["matched_agreement"] == 1.0
    fig = tmp_path / "agree.png"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--n-perm", "5",
                 "--figure", str(fig), "--labels", "A,B,C"]) == 0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--figure", str(fig), "--labels", "A"]) == 2
    assert "--labels gives 1 names for 2 runs" in capsys.readouterr().err
    _routing(tmp_path / "d", top, rng.integers(0, 10, 500), sup)  # other images
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "d")]) == 2
    assert "evaluated on other images" in capsys.readouterr().err
    (tmp_path / "e").mkdir()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "e")]) == 2
    assert "run 'moecnn eval" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a")]) == 2
    assert "at least two runs" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--layer", "nope"]) == 2
    assert "no MoE layer 'nope'" in capsys.readouterr().err


def test_within_class_null_separates_image_level_from_class_level_agreement():
    """Two runs that route by class only (each image's expert drawn from its class's distribution, independently)
    agree no more than the within-class null; two runs that route the same images alike beat it."""
    rng = np.random.default_rng(2)
    classes = rng.integers(0, 20, 3000)
    pref = rng.integers(0, 4, 20)  # each class's favourite expert

    def by_class():  # the favourite 70 % of the time, else a random expert, independently per run
        z = pref[classes].copy()
        other = rng.random(3000) < 0.3
        z[other] = rng.integers(0, 4, other.sum())
        return z

    a = by_class()
    same = compare_pair(a, (a + 1) % 4, n_perm=40, classes=classes)
    assert same["matched_agreement"] == 1.0 and same["agreement_within_class_p"] == pytest.approx(1 / 41)
    assert same["agreement_within_class_null_max"] < 0.8
    only_class = compare_pair(a, by_class(), n_perm=40, classes=classes)
    assert only_class["agreement_within_class_p"] > 0.05
    assert abs(only_class["matched_agreement"] - only_class["agreement_within_class_null_mean"]) < 0.02
    with pytest.raises(ValueError, match="one label per image"):
        compare_pair(a, a, classes=classes[:5])
