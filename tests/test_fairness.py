"""Fairness metrics against hand computations: per-group AUC / logloss / positive rate and top-K,
popularity buckets, exposure, and the max-min gaps."""

import math

import numpy as np
import pytest

from mcl_ray.evaluate.fairness import by_group, exposure, gap, popularity_buckets


def test_per_group_metrics_and_gaps_by_hand():
    y = np.array([1, 0, 1, 0, 1, 1, 0, 0], dtype=float)
    p = np.array([0.9, 0.2, 0.4, 0.6, 0.8, 0.7, 0.1, 0.5])
    groups = np.array(["F", "F", "F", "F", "M", "M", "M", None], dtype=object)  # the last user: unknown
    topk = {"u1": {"recall@10": 0.5}, "u2": {"recall@10": 1.0}, "u3": {"recall@10": 0.0}}
    out = by_group(y, p, groups, topk, {"u1": "F", "u2": "F", "u3": "M"})
    f, m = out["values"]["F"], out["values"]["M"]
    # F: positives 0.9, 0.4; negatives 0.2, 0.6 -> pairs won: (0.9>0.2, 0.9>0.6, 0.4>0.2) = 3 of 4
    assert f["auc"] == pytest.approx(0.75) and f["n"] == 4 and f["positive_rate"] == 0.5
    # M: positives 0.8, 0.7 over negative 0.1 -> 1.0; logloss by hand
    assert m["auc"] == pytest.approx(1.0) and m["positive_rate"] == pytest.approx(2 / 3)
    assert m["logloss"] == pytest.approx(-(np.log(0.8) + np.log(0.7) + np.log(0.9)) / 3)
    assert f["users"] == 2 and f["recall@10"] == pytest.approx(0.75) and m["recall@10"] == 0.0
    assert out["gap"]["auc"] == pytest.approx(0.25) and out["gap"]["recall@10"] == pytest.approx(0.75)
    assert out["gap"]["positive_rate"] == pytest.approx(2 / 3 - 0.5)
    assert set(out["values"]) == {"F", "M"}  # unknown rows are left out, not a group "None"


def test_numeric_group_values_sort_numerically_and_gap_needs_two():
    y = np.array([1, 0, 1, 0, 1, 0], dtype=float)
    p = np.array([0.8, 0.3, 0.6, 0.4, 0.7, 0.2])
    out = by_group(y, p, np.array(["18", "18", "25", "25", "1", "1"], dtype=object))
    assert list(out["values"]) == ["1", "18", "25"]
    assert math.isnan(gap([0.5])) and math.isnan(gap([float("nan"), 0.3])) and gap([0.2, 0.9, 0.5]) == pytest.approx(0.7)


def test_popularity_buckets_hold_equal_shares_of_interactions():
    counts = {"a": 50, "b": 20, "c": 10, "d": 10, "e": 5, "f": 5}  # 100 interactions
    b = popularity_buckets(counts, 3)
    # cumulative share before each item: a 0, b .5, c .7, d .8, e .9, f .95
    assert b == {"a": 0, "b": 1, "c": 2, "d": 2, "e": 2, "f": 2}
    assert popularity_buckets(counts, 1) == dict.fromkeys(counts, 0)


def test_exposure_shares_ratios_and_gap_by_hand():
    counts = {"a": 50, "b": 20, "c": 10, "d": 10, "e": 5, "f": 5}
    buckets = popularity_buckets(counts, 3)
    # two users' top-2: a, b and a, c -> head 2 slots, mid 1, tail 1 of 4
    out = exposure([["a", "b"], ["a", "c"]], buckets, counts, 3, list("abcdefg"))  # g: never in train -> tail
    rows = {r["bucket"]: r for r in out["buckets"]}
    assert [r["bucket"] for r in out["buckets"]] == ["head", "mid", "tail"]
    assert rows["head"]["exposure_share"] == 0.5 and rows["mid"]["exposure_share"] == 0.25
    assert rows["head"]["items"] == 1 and rows["tail"]["items"] == 5 and rows["head"]["train_share"] == 0.5
    assert rows["head"]["exposure_ratio"] == pytest.approx(0.5 / (1 / 7))
    assert rows["tail"]["exposure_ratio"] == pytest.approx(0.25 / (5 / 7))
    assert out["gap"]["exposure_share"] == pytest.approx(0.25)
    assert out["gap"]["exposure_ratio"] == pytest.approx(0.5 * 7 - 0.25 * 7 / 5)


def test_fairness_groups_auto_configured_and_misnamed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mcl_ray.core.config import ConfigError, load_config
    from mcl_ray.core.feature_spec import Feature, FeatureSpec
    from mcl_ray.evaluate.evaluate import fairness_groups, user_attributes

    pq.write_table(pa.table({"user_id": ["1", "2", "3"], "gender": ["F", "M", "F"], "zip": ["a", "b", "c"],
                             "tier": [1, 2, 2]}), tmp_path / "users.parquet")
    spec = FeatureSpec(features=[Feature(name=n, kind="categorical", source="user", vocab_size=4)
                                 for n in ("user_id", "gender", "zip")],
                       scenario_names=["a"], splits={}, num_rows={}, data_fingerprint="x", users_table="users.parquet")
    cfg = load_config("experiments/ml1m_swr_quick.yaml", ["evaluate.fairness_max_values=2"])
    assert fairness_groups(cfg, spec, tmp_path) == ["gender", "zip"]  # user-side categorical features
    assert list(user_attributes(cfg, spec, tmp_path)) == ["gender"]  # zip: 3 values > 2, id-like
    cfg = load_config("experiments/ml1m_swr_quick.yaml", ["evaluate.fairness_groups=[tier]"])
    assert user_attributes(cfg, spec, tmp_path)["tier"].to_dict() == {"1": "1", "2": "2", "3": "2"}  # any column
    cfg = load_config("experiments/ml1m_swr_quick.yaml", ["evaluate.fairness_groups=[gendr]"])
    with pytest.raises(ConfigError, match=r"\['gendr'\] is not a column of the users table; it has"):
        fairness_groups(cfg, spec, tmp_path)
    assert fairness_groups(load_config("experiments/ml1m_swr_quick.yaml", ["evaluate.fairness_groups=[]"]),
                           spec, tmp_path) == []
