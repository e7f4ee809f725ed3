"""Users' own tables in the shapes they come in: no timestamp, no users table, numeric scenario
names, their own column names in text templates, MovieLens defaults kept to MovieLens."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from mcl_ray.cli import app
from mcl_ray.core.config import MOVIELENS_TEXT, ConfigError, load_config, validate_config
from mcl_ray.data.fuse import FusionError
from mcl_ray.data.prepare import prepare, scenario_order


def clicks(folder, n_users=12, n_items=9, scenarios=11):
    """Interactions only: user, item, a 0/1 label, a numeric scenario column; no timestamp."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["uid,sku,clicked,surface"]
    for u in range(n_users):
        for i in range(n_items):
            if (u + i) % 3:
                rows.append(f"user{u},item{i},{(u * i) % 2},{1 + (u + i) % scenarios}")
    (folder / "clicks.csv").write_text("\n".join(rows) + "\n")
    (folder / "items.csv").write_text("item_id,Book-Title,Book-Author\n" + "".join(
        f"item{i},Title {i},Author-{i % 4}\n" for i in range(n_items)))
    return folder


def clicks_config(folder, run_dir, items=False, **prepare_over):
    data = {"source": "tables", "interactions": {
        "path": str(folder / "clicks.csv"), "format": "csv",
        "columns": {"user_id": "uid", "item_id": "sku", "clicked": "clicked", "surface": "surface"}}}
    if items:
        data["items"] = {"path": str(folder / "items.csv"), "format": "csv"}
    prep = {"label": {"column": "clicked", "op": "binary"}, "scenario": {"column": "surface", "groups": None},
            "categorical": [{"name": "user_id"}, {"name": "item_id"}] + ([{"name": "Book-Author"}] if items else []),
            "split": {"kind": "random", "ratios": [0.6, 0.2, 0.2], "seed": 1}}
    if items:
        prep["text"] = {"item": "{Book-Title} by {Book-Author}"}
    prep.update(prepare_over)
    return {"name": "clicks", "run_dir": str(run_dir), "data": data, "prepare": prep,
            "train": {"epochs": 1, "batch_size": 16}, "evaluate": {"ranking_users": 5}}


def test_movielens_text_defaults_stay_with_movielens():
    ml = load_config("experiments/ml1m_swr.yaml")
    assert (ml.prepare.text.item, ml.prepare.text.user) == (MOVIELENS_TEXT["item"], MOVIELENS_TEXT["user"])
    off = load_config("experiments/ml1m_swr_quick.yaml", ["prepare.text.user=null", "model.text.fields=[item]"])
    assert off.prepare.text.user is None and off.prepare.text.item == MOVIELENS_TEXT["item"]
    with pytest.raises(ConfigError, match="prepare.text.user is null"):
        load_config("experiments/ml1m_swr_quick.yaml", ["prepare.text.user=null"])  # the model reads user text
    own = validate_config(clicks_config(__import__("pathlib").Path("/nonexistent"), "/tmp/x"))
    assert own.prepare.text.item is None and own.prepare.text.user is None  # nothing MovieLens-shaped assumed


def test_scenario_names_that_are_numbers_sort_numerically():
    assert scenario_order({"1", "10", "11", "2", "9"}) == ["1", "2", "9", "10", "11"]
    assert scenario_order({"b", "a", "10"}) == ["10", "a", "b"]


@pytest.mark.ray
def test_interactions_without_timestamp_or_users(tmp_path, ray_cluster):
    folder = clicks(tmp_path / "in")
    res = prepare(validate_config(clicks_config(folder, tmp_path / "run", items=True)), force=True)
    names = res.spec.scenario_names
    assert len(names) >= 10 and names == sorted(names, key=int)  # 1, 2, ..., 11, not 1, 10, 11, 2
    assert res.spec.users_table is None and set(res.spec.text) == {"item"}
    stats = json.loads((res.out_dir / "stats.json").read_text())
    assert stats["rows"]["interactions"]["holds"] and stats["rows"]["interactions"]["rows_quarantined"] == 0
    import pyarrow.parquet as pq

    items = pq.read_table(res.out_dir / "items.parquet").to_pandas().set_index("item_id")
    assert items.loc["item3", "text"] == "Title 3 by Author-3"  # a template field with a hyphen
    # something that needs time names itself
    for over in ({"split": {"kind": "temporal"}}, {"context": ["hour"]}):
        with pytest.raises(FusionError, match="no 'timestamp' column, which prepare"):
            prepare(validate_config(clicks_config(folder, tmp_path / "run2", **over)), force=True)


@pytest.mark.ray
def test_run_without_users_or_items_table_serves_and_exits_0(tmp_path, ray_cluster):
    folder = clicks(tmp_path / "in")
    cfg = tmp_path / "clicks.yaml"
    cfg.write_text(yaml.safe_dump(clicks_config(folder, tmp_path / "run")))
    r = CliRunner().invoke(app, ["run", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "POST /v1/recommend" in r.output and "serve it yourself" in r.output  # the served answer
    assert (tmp_path / "run/artifact/model.safetensors").exists()
    assert "positive rate" in r.output and "…" not in r.output  # 11 scenarios: no count cut short
    # a config mistake found by prepare is a config error: exit 2, no traceback
    r = CliRunner().invoke(app, ["prepare", str(cfg), "--set", "prepare.split.kind=temporal"])
    assert r.exit_code == 2 and "timestamp" in r.output and "Traceback" not in r.output


def shop(folder, n_users=40, n_items=25, rows=1500):
    """Every feature kind: numeric and categorical features in users, items and interactions,
    a date/time column for a context feature, scenarios from an interaction column."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.csv").write_text("user_id,age,segment\n" + "".join(
        f"u{u},{18 + u % 50},{'ab'[u % 2]}\n" for u in range(n_users)))
    (folder / "items.csv").write_text("item_id,title,brand,price\n" + "".join(
        f"i{i},Thing {i},b{i % 4},{5 + i * 1.5}\n" for i in range(n_items)))
    lines = ["uid,iid,bought,surface,device,price_seen,when"]
    for r in range(rows):
        u, i = rng.integers(n_users), rng.integers(n_items)
        device = "ios" if rng.random() < 0.5 else "web"
        bought = int((u + i) % 3 == 0 or (device == "ios" and i % 2 == 0))
        lines.append(f"u{u},i{i},{bought},{1 + (u % 3)},{device},{5 + rng.random() * 30:.2f},"
                     f"2024-03-{1 + r % 28:02d} {r % 24:02d}:15:00")
    (folder / "clicks.csv").write_text("\n".join(lines) + "\n")
    return folder


def shop_config(folder, run_dir, users=True, items=True):
    data = {"source": "tables", "interactions": {
        "path": str(folder / "clicks.csv"), "format": "csv",
        "columns": {"user_id": "uid", "item_id": "iid", "timestamp": "when"}}}
    cat, num = [{"name": "user_id"}, {"name": "item_id"}, {"name": "device"}], ["price_seen"]
    if users:
        data["users"] = {"path": str(folder / "users.csv"), "format": "csv"}
        cat.append({"name": "segment"})
        num.append("age")
    if items:
        data["items"] = {"path": str(folder / "items.csv"), "format": "csv"}
        cat.append({"name": "brand"})
        num.append("price")
    return validate_config({
        "name": "shop", "run_dir": str(run_dir), "data": data,
        "prepare": {"label": {"column": "bought", "op": "binary"}, "scenario": {"column": "surface", "groups": None},
                    "categorical": cat, "numeric": num, "context": ["hour"],
                    "text": {"item": "{title} by {brand}"} if items else None},
        "train": {"epochs": 2, "batch_size": 64, "num_workers": 0, "lr": 0.002},
        "evaluate": {"ranking_users": 10}})


@pytest.mark.ray
@pytest.mark.parametrize("users, items", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["interactions", "users", "items", "both"])
def test_every_table_shape_trains_evaluates_exports_and_serves(tmp_path, ray_cluster, users, items):
    from mcl_ray.artifact import export_artifact
    from mcl_ray.serve.recommender import Query, Recommender
    from mcl_ray.train.trainer import train_one

    cfg = shop_config(shop(tmp_path / "in"), tmp_path / "run", users, items)
    prep = prepare(cfg, force=True)
    assert prep.spec.scenario_names == ["1", "2", "3"]
    r = train_one(cfg, prep.out_dir, tmp_path / "run/train", seed=1)
    metrics = json.loads((r.train_dir / "metrics.json").read_text())
    assert metrics["overall"]["auc"] > 0.5 and metrics["ranking"]  # top-K without users/items tables too
    rec = Recommender(str(export_artifact(r.train_dir, prep.out_dir, tmp_path / "art")))
    info = rec.info()
    assert set(info["request_fields"]["context"]) == {"device", "price_seen", "hour"}
    assert set(info["request_fields"]["profile"]) == ({"segment", "age"} if users else set())
    q = Query(user_id="u3", scenario="2", k=5, exclude_seen=False)
    plain = rec.recommend_many([q])[0]
    assert len(plain["items"]) == 5 and not plain["cold_start"]
    ctx = rec.recommend_many([Query(user_id="u3", scenario="2", k=5, exclude_seen=False,
                                    context={"device": "ios", "price_seen": 30.0, "hour": 13})])[0]
    assert [i["score"] for i in ctx["items"]] != [i["score"] for i in plain["items"]]  # the request's features count
    bad = rec.recommend_many([Query(user_id="u3", scenario="2", k=5, context={"price_seen": "cheap"})])[0]
    assert bad.status == 422 and "context.price_seen must be a number" in str(bad)


@pytest.mark.ray
def test_augment_on_interactions_only_with_hashed_item_ids(tmp_path, ray_cluster):
    """The augment stage's data side on the barest shape: no items table (prompts name items by
    key) and a hashed item_id (candidates come from the train split, not a vocabulary)."""
    import pandas as pd

    from mcl_ray.llm.augment import build_requests, postprocess, read_train, real_interactions

    raw = clicks_config(clicks(tmp_path / "in", n_users=30, n_items=25, scenarios=2), tmp_path / "run")
    raw["prepare"]["categorical"][1]["hash_buckets"] = 64
    raw["augment"] = {"num_users": 4, "max_interactions": 40, "num_candidates": 4, "random_candidates": 1}
    cfg = validate_config(raw)
    res = prepare(cfg, force=True)
    assert res.spec.items_table is None and {f.name: f.hash_buckets for f in res.spec.categorical}["item_id"] == 64
    train = read_train(res.spec, res.out_dir)
    reqs, info = build_requests(cfg, res.spec, res.out_dir, train)
    assert len(reqs) == 4 and info["train_rows"] == len(train)
    for r in reqs.itertuples():
        seen = set(train.loc[train["user_key"] == r.user_key, "item_key"])
        assert len(r.candidates) == 4 and not set(r.candidates) & seen and set(r.candidates) <= set(train["item_key"])
        assert r.candidates[0] in r.messages_json  # the key stands in for a title
    answers = pd.DataFrame({"id": reqs["id"], "answer": '{"like": "A", "dislike": "B"}', "generated_tokens": 9})
    real = real_interactions(res.spec, res.out_dir, set(reqs["user_key"]))
    rows, log, stats = postprocess(reqs, answers, real, res.spec, train)
    # a pick that repeats a real valid/test interaction is dropped and counted, never written
    assert stats["valid"] == 4 and len(rows) + stats["duplicates_of_real"] == 8 and (rows["is_synthetic"] == 1).all()
    assert not any((u, i) in real for u, i in zip(rows["user_key"], rows["item_key"]))
    item_id = train.drop_duplicates("item_key").set_index("item_key")["item_id"]
    assert (rows["item_id"].to_numpy() == item_id.loc[rows["item_key"]].to_numpy()).all()  # the hashed ids train uses
