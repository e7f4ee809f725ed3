"""The synthetic source: seeded, layout-independent, with planted scenario preferences."""

import pandas as pd
import pyarrow as pa
import pytest

from mcl_ray.core.config import SyntheticSource
from mcl_ray.data import synthetic

pytestmark = pytest.mark.ray


def interactions(src):
    import ray

    tables = synthetic.synthetic_tables(src)
    return tables, pa.concat_tables(ray.get(tables.interactions.to_arrow_refs())).to_pandas()


def test_same_seed_same_data_whatever_the_blocks(ray_cluster):
    _, a = interactions(SyntheticSource(source="synthetic", num_users=300, num_items=80, num_interactions=5000,
                                        num_blocks=2, seed=3))
    _, b = interactions(SyntheticSource(source="synthetic", num_users=300, num_items=80, num_interactions=5000,
                                        num_blocks=7, seed=3))
    _, c = interactions(SyntheticSource(source="synthetic", num_users=300, num_items=80, num_interactions=5000,
                                        num_blocks=2, seed=4))
    assert len(a) == 5000
    # parallel blocks may arrive in any order: compare the rows as a multiset
    key = ["user_id", "item_id", "timestamp", "rating"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True))
    assert not a.equals(c)


def test_planted_scenario_preferences(ray_cluster):
    src = SyntheticSource(source="synthetic", num_users=2000, num_items=400, num_interactions=60_000, seed=1)
    tables, inter = interactions(src)
    users = tables.users.to_pandas().set_index("user_id")
    items = tables.items.to_pandas().set_index("item_id")
    assert set(users["segment"]) == {"seg0", "seg1", "seg2"}
    # 3 scenarios agree with the SWR age groups, so the default ML-1M rule applies too
    for seg, ages in zip(("seg0", "seg1", "seg2"), synthetic.AGE_GROUPS_3):
        assert set(users.loc[users.segment == seg, "age"]) <= set(ages)
    df = inter.assign(segment=users.loc[inter.user_id, "segment"].to_numpy(),
                      genre=items.loc[inter.item_id, "genres"].str.split("|").str[0].to_numpy(),
                      click=(inter.rating > 3).astype(float))
    liked = synthetic.scenario_genres(src.seed, 3)
    g0 = synthetic.GENRES[liked[0][0]]  # liked by seg0, disliked by seg2 (whose "other" is seg0)
    rate = df[df.genre == g0].groupby("segment")["click"].mean()
    assert rate["seg0"] - rate["seg2"] > 0.3
    # items carry text for the LLM stage
    assert items["title"].str.len().gt(5).all() and items["genres"].str.len().gt(2).all()


def test_prepare_on_synthetic(tmp_path, ray_cluster):
    from mcl_ray.core.config import load_config
    from mcl_ray.data.prepare import prepare

    cfg = load_config("experiments/synthetic_quick.yaml", [f"run_dir={tmp_path}", "data.num_interactions=20000"])
    res = prepare(cfg)
    assert res.spec.scenario_names == ["seg0", "seg1", "seg2"]
    assert res.stats["rows"]["interactions"]["rows_kept"] == 20_000
    assert 0.2 < res.stats["splits"]["train"]["positive_rate"] < 0.8
