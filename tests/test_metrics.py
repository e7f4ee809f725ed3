"""Metric values against hand computations on fixed inputs."""

import math

import numpy as np
import pytest
import torch

from mcl_ray.evaluate.metrics import binary_metrics, gauc, topk_metrics


def test_auc_and_logloss_by_hand():
    y = np.array([0, 0, 1, 1, 0, 1], dtype=float)
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    scen = np.array([0, 0, 0, 0, 1, 1])
    m = binary_metrics(y, p, scen, ["a", "b"])
    # overall: positives {0.35,0.8,0.9} vs negatives {0.1,0.4,0.2}: 8 of 9 pairs ordered right
    assert m["overall"]["auc"] == pytest.approx(8 / 9)
    ll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert m["overall"]["logloss"] == pytest.approx(ll)
    assert m["by_scenario"]["a"]["auc"] == pytest.approx(0.75)  # 3 of 4 pairs
    assert m["by_scenario"]["b"]["auc"] == pytest.approx(1.0)
    assert m["by_scenario"]["a"]["n"] == 4


def test_single_class_scenario_gives_nan_not_an_error():
    m = binary_metrics(np.array([1.0, 1.0]), np.array([0.2, 0.3]), np.array([0, 0]), ["a"])
    assert math.isnan(m["overall"]["auc"])


def test_gauc_weights_users_by_rows_and_skips_single_class_users():
    y = np.array([1, 0, 0, 1, 1, 0, 1], dtype=float)
    p = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.4, 0.3])
    users = np.array(["u1", "u1", "u2", "u2", "u3", "u3", "u4"])
    # u1 auc 1 (2 rows), u2 auc 0 (2 rows), u3 auc 1 (2 rows), u4 single-class: skipped
    assert gauc(y, p, users) == pytest.approx((2 * 1 + 2 * 0 + 2 * 1) / 6)


def test_topk_metrics_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7, -torch.inf],
                           [0.1, 0.2, 0.3, 0.4, 0.5]])
    relevant = torch.tensor([[True, False, True, False, False],
                             [False, False, False, False, True]])
    m = topk_metrics(scores, relevant, [2])
    # user 1: top2 = items 0,1 -> 1 hit of 2 relevant: recall .5, precision .5, hit 1
    # user 2: top2 = items 4,3 -> 1 hit of 1: recall 1, precision .5, hit 1
    assert m["recall@2"] == pytest.approx(0.75)
    assert m["precision@2"] == pytest.approx(0.5)
    assert m["hitrate@2"] == pytest.approx(1.0)
    assert m["f1@2"] == pytest.approx((0.5 + 2 * 0.5 / 1.5) / 2)
    # ndcg user 1: dcg = 1/log2(2) = 1; idcg = 1 + 1/log2(3); user 2: 1
    ndcg1 = 1 / (1 + 1 / math.log2(3))
    assert m["ndcg@2"] == pytest.approx((ndcg1 + 1) / 2, rel=1e-5)


def test_gauc_matches_per_user_roc_auc_with_ties():
    """The vectorised GAUC equals the per-user roc_auc_score loop it replaced, ties included."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    users = rng.integers(0, 300, 5000).astype(str)
    y = (rng.random(5000) < 0.4).astype(float)
    p = np.round(rng.random(5000), 1)  # many ties within a user
    total = weight = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            total += roc_auc_score(y[m], p[m]) * m.sum()
            weight += m.sum()
    assert gauc(y, p, users) == pytest.approx(total / weight, abs=1e-12)
    assert math.isnan(gauc(np.ones(3), np.ones(3), np.array(["a", "b", "c"])))
