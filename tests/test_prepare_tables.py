"""prepare on hand-made tables: exact fused rows, validation policies, splits and vocabularies."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mcl_ray.core.config import validate_config
from mcl_ray.data.prepare import DataValidationError, prepare
from mcl_ray.core.feature_spec import FeatureSpec

import tiny_data

pytestmark = pytest.mark.ray


def run(tmp_path, ray_cluster, folder=None, **prep):
    folder = folder or tiny_data.write(tmp_path / "in")
    cfg = validate_config(tiny_data.config(folder, tmp_path / "run", **prep))
    return prepare(cfg, force=True)


def read_split(res, split="train"):
    df = pd.concat([pq.read_table(p).to_pandas() for p in sorted((res.out_dir / res.spec.splits[split]).glob("*.parquet"))])
    return df.sort_values(["user_key", "item_key"]).reset_index(drop=True)


def test_fusion_exact_rows(tmp_path, ray_cluster):
    res = run(tmp_path, ray_cluster)
    df = read_split(res)
    vocabs = json.loads((res.out_dir / "vocabs.json").read_text())
    dec = lambda f, i: vocabs[f][i - 1] if i else None  # noqa: E731
    got = [(r.user_key, r.item_key, dec("gender", r.gender), dec("first_genre", r.first_genre), dec("age", r.age),
            dec("hour", r.hour), dec("weekday", r.weekday), res.spec.scenario_names[r.scenario], r.label)
           for r in df.itertuples()]
    assert got == [
        ("u1", "i1", "F", "Drama", "25", "1", "6", "mid", 1.0),
        ("u1", "i2", "F", "Comedy", "25", "2", "6", "mid", 0.0),
        ("u2", "i2", "M", "Comedy", "18", "6", "6", "young", 1.0),
        ("u2", "i3", "M", "Action", "18", "3", "6", "young", 1.0),
        ("u3", "i1", "M", "Drama", "45", "4", "6", "old", 0.0),
        ("u3", "i3", "M", "Action", "45", "5", "6", "old", 0.0),
    ]
    # year is z-normalised with the train mean/std
    year = {f.name: f for f in res.spec.features}["year"]
    raw = np.array([1999, 2001, 2001, 1987, 1999, 1987], dtype=float)
    assert year.mean == pytest.approx(raw.mean()) and year.std == pytest.approx(raw.std())
    expect = (np.array([1999, 2001, 2001, 1987, 1999, 1987]) - raw.mean()) / raw.std()
    np.testing.assert_allclose(df["year"].to_numpy(), expect, rtol=1e-5)
    assert df["weight"].eq(1.0).all() and df["is_synthetic"].eq(0).all()
    # text fields for the LLM stage
    items = pq.read_table(res.out_dir / "items.parquet").to_pandas().set_index("item_id")
    assert items.loc["i1", "text"] == "Alpha (1999): Drama, Romance"
    users = pq.read_table(res.out_dir / "users.parquet").to_pandas().set_index("user_id")
    assert users.loc["u2", "text"] == "M aged 18"
    spec = FeatureSpec.load(res.out_dir)
    assert spec.scenario_names == ["young", "mid", "old"]
    assert {f.name: f.source for f in spec.features}["gender"] == "user"
    assert spec.text["item"].key == "item_id"
    assert res.stats["rows"]["interactions"] == {"rows_in": 6, "rows_kept": 6, "rows_quarantined": 0, "holds": True}


BAD_INTERACTIONS = """user_id,item_id,rating,timestamp
u1,i1,5,1000000000
u1,i2,7,1000003600
u9,i3,4,1000007200
u3,i8,3,1000010800
u3,i3,,1000014400
u2,i2,5,yesterday
,i2,4,1000018000
u4,i1,4,1000018000
"""
BAD_USERS = tiny_data.USERS + "u2,18,M,4,20002\nu4,33,F,1,40004\n"


def test_quarantine_reasons_and_invariant(tmp_path, ray_cluster):
    folder = tiny_data.write(tmp_path / "in", users=BAD_USERS, interactions=BAD_INTERACTIONS)
    res = run(tmp_path, ray_cluster, folder=folder, validation={"policy": "quarantine"})
    rows = res.stats["rows"]
    assert rows["interactions"] == {"rows_in": 8, "rows_kept": 1, "rows_quarantined": 7, "holds": True}
    assert rows["users"] == {"rows_in": 5, "rows_kept": 4, "rows_quarantined": 1, "holds": True}
    q = pd.concat([pq.read_table(p).to_pandas() for p in (res.out_dir / "quarantine" / "interactions").glob("*.parquet")])
    reasons = sorted(q["_reason"])
    assert reasons == sorted(["out_of_range:rating", "unknown_user:user_id", "unknown_item:item_id", "null:rating",
                              "bad_type:timestamp", "null:user_id", "unknown_scenario:age"])
    row = q[q["_reason"] == "bad_type:timestamp"].iloc[0]
    assert json.loads(row["_raw"])["timestamp"] == "yesterday"
    assert row["_source"].endswith("interactions.csv")
    qu = pq.read_table(res.out_dir / "quarantine" / "users.parquet").to_pandas()
    assert qu["_reason"].tolist() == ["duplicate_key:user_id"]
    assert res.stats["quarantine_reasons"]["interactions"]["unknown_item:item_id"] == 1


def test_fail_policy_names_file_column_count_examples(tmp_path, ray_cluster):
    folder = tiny_data.write(tmp_path / "in", interactions=BAD_INTERACTIONS)
    with pytest.raises(DataValidationError) as e:
        run(tmp_path, ray_cluster, folder=folder)
    msg = str(e.value)
    assert "1 rows with out_of_range in column 'rating'" in msg
    assert "interactions.csv" in msg
    assert '"rating": "7"' in msg  # the example row, as the file has it (CSV values are read as text)
    assert "policy=quarantine" in msg


def test_undecodable_text_is_quarantined(tmp_path, ray_cluster):
    items = tiny_data.ITEMS.encode() + b"i4,Caf\xe9 Noir,1990,Drama\n"
    inter = tiny_data.INTERACTIONS + "u1,i4,4,1000020000\n"
    folder = tiny_data.write(tmp_path / "in", items=items, interactions=inter)
    res = run(tmp_path, ray_cluster, folder=folder, validation={"policy": "quarantine"})
    qi = pq.read_table(res.out_dir / "quarantine" / "items.parquet").to_pandas()
    assert qi["_reason"].tolist() == ["undecodable_text:title"]
    assert json.loads(qi["_raw"].iloc[0])["title"] == "Caf\\xe9 Noir"  # raw bytes shown, escaped
    # the interaction on the quarantined item is set aside too, so rows_in = kept + quarantined
    assert res.stats["rows"]["interactions"] == {"rows_in": 7, "rows_kept": 6, "rows_quarantined": 1, "holds": True}


def test_empty_and_missing_column_errors(tmp_path, ray_cluster):
    from mcl_ray.data.fuse import FusionError

    folder = tiny_data.write(tmp_path / "a", interactions="user_id,item_id,rating,timestamp\n")
    with pytest.raises(DataValidationError, match="interactions are empty"):
        run(tmp_path, ray_cluster, folder=folder)
    folder = tiny_data.write(tmp_path / "b", interactions="user,item_id,rating,timestamp\nu1,i1,5,1\n")
    with pytest.raises(FusionError, match=r"lack required columns \['user_id'\]"):
        run(tmp_path, ray_cluster, folder=folder)
    folder = tiny_data.write(tmp_path / "c")
    with pytest.raises(FusionError, match="'colour'.*is in no table"):
        run(tmp_path, ray_cluster, folder=folder, categorical=[{"name": "colour"}])


def test_column_mapping_through_config(tmp_path, ray_cluster):
    folder = tiny_data.write(tmp_path / "in", interactions=tiny_data.INTERACTIONS.replace("user_id,item_id", "uid,iid", 1))
    raw = tiny_data.config(folder, tmp_path / "run")
    raw["data"]["interactions"]["columns"] = {"user_id": "uid", "item_id": "iid"}
    res = prepare(validate_config(raw), force=True)
    assert res.stats["rows"]["interactions"]["rows_kept"] == 6


def test_no_leakage_into_vocabularies(tmp_path, ray_cluster):
    # u3 and i3 appear only in rows that the split puts outside train
    from mcl_ray.data.fuse import assign_random_split, split_uniform

    inter = pd.read_csv(__import__("io").StringIO(tiny_data.INTERACTIONS), dtype=str)
    res = run(tmp_path, ray_cluster, split={"kind": "random", "ratios": [0.5, 0.25, 0.25], "seed": 3})
    u = split_uniform(inter.user_id.to_numpy(), inter.item_id.to_numpy(), inter.timestamp.astype(int).to_numpy(), 3)
    split = assign_random_split(u, (0.5, 0.25, 0.25))
    train_users = set(inter.user_id[split == "train"])
    vocabs = json.loads((res.out_dir / "vocabs.json").read_text())
    assert set(vocabs["user_id"]) == train_users
    assert set(vocabs["item_id"]) == set(inter.item_id[split == "train"])
    held_out = pd.concat([read_split(res, s) for s in ("valid", "test") if s in res.spec.splits])
    unseen = ~held_out.user_key.isin(train_users)
    assert unseen.any(), "the fixture must hold a user seen only outside train"
    assert (held_out.user_id[unseen] == 0).all()  # unseen values get the OOV id
    assert (held_out.user_id[~unseen] > 0).all()  # seen ones keep their id


def test_min_count_sends_rare_values_to_oov(tmp_path, ray_cluster):
    res = run(tmp_path, ray_cluster, categorical=[{"name": "user_id", "min_count": 2}, {"name": "item_id", "min_count": 3}])
    vocabs = json.loads((res.out_dir / "vocabs.json").read_text())
    assert vocabs["user_id"] == ["u1", "u2", "u3"]  # each has 2 rows
    assert vocabs["item_id"] == []
    assert read_split(res)["item_id"].eq(0).all()


def test_temporal_leave_last_out(tmp_path, ray_cluster):
    res = run(tmp_path, ray_cluster, split={"kind": "temporal", "temporal_mode": "leave_last_out"})
    got = {s: sorted(zip(read_split(res, s).user_key, read_split(res, s).item_key)) for s in res.spec.splits}
    # each user has 2 rows: the later one is test, the earlier train (valid needs >= 3 rows)
    assert got == {"train": [("u1", "i1"), ("u2", "i3"), ("u3", "i1")],
                   "test": [("u1", "i2"), ("u2", "i2"), ("u3", "i3")]}


def test_temporal_global_cut(tmp_path, ray_cluster):
    res = run(tmp_path, ray_cluster, split={"kind": "temporal", "temporal_mode": "global_cut",
                                            "ratios": [0.5, 0.25, 0.25]})
    train = read_split(res, "train")
    assert train.timestamp.max() < min(read_split(res, s).timestamp.min() for s in res.spec.splits if s != "train")


def test_cache_reuse_and_invalidation(tmp_path, ray_cluster):
    folder = tiny_data.write(tmp_path / "in")
    cfg = validate_config(tiny_data.config(folder, tmp_path / "run"))
    first = prepare(cfg)
    assert not first.cached
    assert prepare(cfg).cached
    (folder / "interactions.csv").write_text(tiny_data.INTERACTIONS + "u1,i3,4,1000030000\n")
    third = prepare(cfg)
    assert not third.cached and third.stats["rows"]["interactions"]["rows_in"] == 7
