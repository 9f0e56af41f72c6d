"""Pure-array statistics of moecnn.analysis.stats (fast, no model)."""
import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from moecnn.analysis import stats


def _sparse(rng, m, n, k):
    logits = rng.normal(size=(m, n))
    top = np.argsort(-logits, 1)[:, :k]
    w = np.zeros((m, n))
    v = np.exp(np.take_along_axis(logits, top, 1))
    np.put_along_axis(w, top, v / v.sum(1, keepdims=True), 1)
    return logits, w


def test_utilisation_definitions():
    w = np.array([[1.0, 0, 0], [0.5, 0.5, 0], [0.6, 0.4, 0], [0.0, 1.0, 0]])
    u = stats.utilisation(w)
    imp = w.mean(0)
    assert np.allclose(u["mean_importance"], imp)
    assert u["cv_imp"] == pytest.approx(imp.std() / imp.mean())
    act = (w > 0).mean(0)
    assert np.allclose(u["routed_share"], act)
    assert u["cv_act"] == pytest.approx(act.std() / act.mean())
    assert u["living"] == [True, True, False] and u["n_living"] == 2
    assert np.allclose(u["top1_share"], [0.75, 0.25, 0.0])


def test_coactivation_counts_top2_pairs():
    w = np.array([[0.6, 0.4, 0, 0], [0, 0.7, 0.3, 0], [0.5, 0.5, 0, 0], [0, 0, 0.1, 0.9]])
    co = stats.coactivation(w)
    assert co[0, 1] == co[1, 0] == 2 and co[1, 2] == 1 and co[2, 3] == 1
    assert co.sum() == 2 * len(w) and np.all(np.diag(co) == 0)
    tp = stats.top_pairs(co, len(w), n=1)
    assert tp[0]["pair"] == [0, 1] and tp[0]["count"] == 2 and tp[0]["share"] == 0.5
    # k = 1: the runner-up comes from the logits
    w1 = np.array([[1.0, 0, 0], [0, 0, 1.0]])
    lg = np.array([[3.0, 0.0, 2.0], [0.0, 1.0, 2.0]])
    co1 = stats.coactivation(w1, lg)
    assert co1[0, 2] == 1 and co1[1, 2] == 1


def test_group_matrix_and_top_groups():
    w = np.array([[1.0, 0], [0.8, 0.2], [0, 1.0], [0.1, 0.9]])
    y = np.array([0, 0, 1, 1])
    mat, counts = stats.group_expert_matrix(w, y, 3)
    assert np.allclose(mat[:2], [[0.9, 0.1], [0.05, 0.95]]) and np.isnan(mat[2]).all()
    assert counts.tolist() == [2, 2, 0]
    top = stats.top_groups_per_expert(mat, ["orchid", "rose", "empty"], n=2)
    assert top[0][0] == "orchid" and top[1][0] == "rose"


def test_vectorised_nmi_matches_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 7, 500)
        z = rng.integers(0, 4, 500)
        z[:250] = y[:250] % 4
        cont = stats._contingencies(y, z, 7, 4)
        assert stats.nmi_from_contingency(cont)[0] == pytest.approx(normalized_mutual_info_score(y, z), abs=1e-10)


def test_specialisation_planted_and_null():
    rng = np.random.default_rng(1)
    sup = rng.integers(0, 2, 2000)
    res = stats.specialisation(sup.copy(), sup, n_perm=200)
    assert res["nmi"] == pytest.approx(1.0) and res["purity"] == pytest.approx(1.0)
    assert res["nmi_p"] == pytest.approx(1 / 201) and res["nmi_p"] < 0.01
    assert res["nmi_null_max"] < 0.02
    rnd = stats.specialisation(rng.integers(0, 2, 2000), sup, n_perm=200)
    assert rnd["nmi"] < 0.02 and rnd["nmi_p"] > 0.01


def test_specialisation_is_fast_on_10k():
    import time

    rng = np.random.default_rng(2)
    y = rng.integers(0, 100, 10_000)
    z = rng.integers(0, 10, 10_000)
    t = time.perf_counter()
    stats.specialisation(z, y, n_perm=200)
    assert time.perf_counter() - t < 10  # vectorised: well under a second on an idle core


def test_extremes_and_epochs():
    w = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    ex = stats.extreme_images(w, 2)
    assert ex["most"][0] == [0, 2] and ex["least"][0] == [1, 2]
    # ties (images not routed to the expert) are broken by the raw logits
    w0 = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    lg = np.array([[2.0, 1.0], [5.0, -1.0], [0.0, 3.0]])
    ex0 = stats.extreme_images(w0, 2, lg)
    assert ex0["most"][0] == [1, 0] and ex0["least"][1] == [1, 0]
    recs = [{"epoch": 0, "routing": {"layer4.moe": {"importance": [0.7, 0.3], "routed": [1.0, 1.0]}}},
            {"epoch": 1, "routing": {"layer4.moe": {"importance": [0.5, 0.5], "routed": [1.0, 1.0]}}},
            {"epoch": 2, "train/layer4.moe/importance": [0.4, 0.6]}]
    ev = stats.epoch_utilisation(recs)
    d = ev["layer4.moe"]
    assert d["epoch"] == [0, 1, 2] and d["cv_imp"][1] == pytest.approx(0.0)
    assert d["cv_imp"][0] == pytest.approx(0.4)


def test_random_sparse_routing_is_balanced():
    rng = np.random.default_rng(3)
    lg, w = _sparse(rng, 4000, 4, 2)
    u = stats.utilisation(w, lg)
    assert u["cv_imp"] < 0.1 and u["n_living"] == 4 and u["mean_active"] == pytest.approx(2.0)
