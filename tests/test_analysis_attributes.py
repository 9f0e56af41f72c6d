"""Pixel attributes (known answers on hand-made images) and the association tests / BH wrappers."""
import numpy as np
import pytest

from moecnn.analysis import stats
from moecnn.analysis.attributes import image_attributes


def _solid(rgb, size=16):
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8)[:, None, None], (3, size, size)).copy()


def test_attribute_known_answers():
    red, green, blue, grey, white, black = (_solid(c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255),
                                                                 (128, 128, 128), (255, 255, 255), (0, 0, 0)))
    half = black.copy()
    half[:, :, 8:] = 255  # left black, right white: one vertical edge
    checker = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)
    checker = np.repeat(checker[None], 3, 0)
    a = image_attributes(np.stack([red, green, blue, grey, white, black, half, checker]))
    assert a["hue"][:3] == pytest.approx([0.0, 120.0, 240.0], abs=1e-3)
    assert np.all(np.isnan(a["hue"][3:]))  # grey, white, black, black/white: no hue
    assert a["saturation"] == pytest.approx([1, 1, 1, 0, 0, 0, 0, 0])
    assert a["brightness"][[0, 1, 2, 4, 5, 6]] == pytest.approx([0.299, 0.587, 0.114, 1.0, 0.0, 0.5], abs=1e-6)
    assert a["contrast"][[4, 6, 7]] == pytest.approx([0.0, 0.5, 0.5], abs=1e-6)
    assert a["high_freq"][7] > 0.99 and a["high_freq"][4] == 0 and a["high_freq"][6] < 0.2
    assert a["edge_density"][[0, 4, 5]].tolist() == [0, 0, 0]
    assert a["edge_density"][6] == pytest.approx(2 / 16)  # the two columns beside the step
    # Sobel smoothing cancels a one-pixel checkerboard (the high_freq attribute sees it); only the 4 corners remain
    assert a["edge_density"][7] == pytest.approx(4 / 256)
    g = image_attributes(np.stack([half[:1], checker[:1]]))  # grey images: no hue or saturation
    assert set(g) == {"brightness", "contrast", "high_freq", "edge_density"}
    with pytest.raises(ValueError, match="uint8"):
        image_attributes(np.zeros((2, 3, 4, 4)))


def test_association_continuous_matches_scipy():
    from scipy.stats import kruskal

    rng = np.random.default_rng(0)
    z = rng.integers(0, 3, 300)
    x = rng.normal(size=300) + 0.5 * z
    x[:5] = np.nan
    t = stats.association_continuous(x, z, n_perm=200, seed=1)
    ref = kruskal(*[x[5:][z[5:] == g] for g in range(3)])
    assert t["statistic"] == pytest.approx(ref.statistic) and t["p_asymptotic"] == pytest.approx(ref.pvalue)
    assert t["effect"] == pytest.approx(ref.statistic / (295 - 1)) and t["n"] == 295
    assert t["p_perm"] == pytest.approx(1 / 201) and t["null_q95"] < t["statistic"]
    assert t["n_perm"] == 200 and t["seed"] == 1 and t["null_mean"] < t["null_q95"]
    assert stats.association_continuous(x, z, n_perm=200, seed=1) == t  # seeded
    assert stats.association_continuous(np.ones(50), np.arange(50) % 2)["degenerate"] == "the attribute is constant"
    assert stats.association_continuous(x, np.zeros(300, int))["p_perm"] == 1.0


def test_association_circular_wraps_around():
    rng = np.random.default_rng(1)
    z = np.arange(200) % 2
    # E0 around 355°, E1 around 5°: 10° apart on the circle although 350 apart as numbers
    a = np.where(z == 0, 355.0, 5.0) + rng.normal(0, 3, 200)
    t = stats.association_circular(a % 360, z, n_perm=100)
    assert t["group_mean"]["0"] == pytest.approx(355, abs=1) and t["group_mean"]["1"] == pytest.approx(5, abs=1)
    assert 0.5 < t["effect"] < 1 and t["p_perm"] < 0.02
    same = stats.association_circular(rng.uniform(0, 360, 200), z, n_perm=100)
    assert same["effect"] < 0.05 and same["p_perm"] > 0.01
    exact = stats.association_circular(np.where(z == 0, 90.0, 270.0), z, n_perm=50)
    assert exact["effect"] == pytest.approx(1.0)


def test_association_categorical_and_bh():
    from scipy.stats.contingency import association
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(2)
    c = rng.integers(0, 3, 300)
    z = np.where(rng.random(300) < 0.7, c % 2, rng.integers(0, 2, 300))
    c[:10] = -1  # unlabelled
    t = stats.association_categorical(c, z, n_perm=200)
    assert t["n"] == 290 and np.sum(t["table"]) == 290 and t["categories"] == [0, 1, 2]
    assert t["effect"] == pytest.approx(association(np.asarray(t["table"]), method="cramer"))
    assert t["nmi"] == pytest.approx(normalized_mutual_info_score(c[10:], z[10:]))
    assert t["p_perm"] < 0.01 and t["dof"] == 2
    p = [0.001, 0.01, 0.02, 0.04, 0.3]
    reject, adj = stats.bh_adjust(p, alpha=0.05)
    assert reject.tolist() == [True, True, True, True, False]
    assert adj.tolist() == pytest.approx([0.005, 0.025, 1 / 30, 0.05, 0.3])
    assert stats.bh_adjust([])[0].size == 0


def test_an_expert_with_one_image_is_left_out_of_the_tests():
    """Early in training an expert may get a single image: the tests run on the other experts."""
    from moecnn.analysis import stats

    rng = np.random.default_rng(0)
    x, z = rng.normal(size=41), np.array([0] * 20 + [1] * 20 + [2])
    r = stats.association_continuous(x, z, n_perm=50)
    assert r["n_groups"] == 2 and r["n"] == 40 and 0 < r["p_perm"] <= 1
    c = stats.association_circular(rng.uniform(0, 360, 41), z, n_perm=50)
    assert c["n_groups"] == 2 and c["n"] == 40
    assert stats.association_continuous(x[:21], z[20:], n_perm=50)["degenerate"]
