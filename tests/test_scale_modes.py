"""Data larger than a worker's memory: streamed training and evaluation, hashed ids."""

import json

import numpy as np
import pyarrow as pa
import pytest

from mcl_ray.core.config import validate_config
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.data.vocab import hashed_ids
from mcl_ray.train.trainer import data_mode, shard_mib

from test_table_shapes import shop, shop_config


def test_hashed_ids_are_stable_bounded_and_null_is_0():
    vals = pa.array(["u1", "u2", None, "u1", "25"])
    ids = hashed_ids(vals, 1000).to_pylist()
    assert ids == hashed_ids(vals, 1000).to_pylist() and ids[0] == ids[3] and ids[2] == 0
    assert all(1 <= i <= 1000 for i in ids if i)
    assert hashed_ids(pa.array([25]), 1000).to_pylist() == [ids[4]]  # 25 and "25" are one key
    many = hashed_ids(pa.array([f"user{i}" for i in range(20_000)]), 1 << 20).to_numpy()
    collided = 1 - len(np.unique(many)) / len(many)
    assert collided < 0.03  # expected 1 - exp(-n/B) ~ 1.9%


def test_auto_data_mode_streams_when_the_shard_exceeds_the_budget(tmp_path):
    cfg = shop_config(tmp_path, tmp_path / "run")
    spec = FeatureSpec(features=[], scenario_names=["a"], splits={}, num_rows={"train": 10_000_000},
                       data_fingerprint="x")
    assert shard_mib(cfg, spec) > 100
    assert data_mode(cfg, spec) == "memory"  # default budget 2 GiB: ~324 MiB fits
    low = cfg.model_copy(update={"train": cfg.train.model_copy(update={"memory_budget_mb": 100})})
    assert data_mode(low, spec) == "stream"
    fixed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"data_mode": "memory", "memory_budget_mb": 1})})
    assert data_mode(fixed, spec) == "memory"


@pytest.mark.ray
def test_stream_and_memory_modes_and_hashed_ids(tmp_path, ray_cluster):
    import ray

    from mcl_ray.artifact import export_artifact
    from mcl_ray.data.prepare import prepare
    from mcl_ray.data.splits import model_columns
    from mcl_ray.evaluate.evaluate import evaluate_train_dir, predict
    from mcl_ray.models.batch import load_split
    from mcl_ray.models.weights import MODEL, load_trained
    from mcl_ray.serve.recommender import Query, Recommender
    from mcl_ray.train.loop import predict_stream
    from mcl_ray.train.trainer import train_one

    raw = shop_config(shop(tmp_path / "in"), tmp_path / "run").model_dump(mode="json")
    raw["prepare"]["categorical"][0]["hash_buckets"] = 4096  # user_id: no vocabulary
    raw["prepare"]["text"] = None
    cfg = validate_config(raw)
    prep = prepare(cfg, force=True)
    assert "user_id" not in json.loads((prep.out_dir / "vocabs.json").read_text())
    assert {f.name: f.hash_buckets for f in prep.spec.categorical}["user_id"] == 4096

    # memory mode trains in every other training test; here the streamed path, across 2 workers
    c = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "data_mode": "stream", "num_workers": 2, "shuffle_buffer_rows": 256})})
    runs = {"stream": train_one(c, prep.out_dir, tmp_path / "train_stream", seed=1)}
    assert runs["stream"].metrics["overall"]["auc"] > 0.55  # it learns
    assert len(runs["stream"].history) == cfg.train.epochs

    # the same weights give the same predictions and metrics whichever way the data comes
    spec = prep.spec
    model = load_trained(spec, cfg.model, runs["stream"].train_dir / MODEL)
    valid = load_split(prep.out_dir, spec, "valid")
    p_mem = predict(model, valid, 97, __import__("torch").device("cpu"))
    ds = ray.data.read_parquet(str(prep.out_dir / spec.splits["valid"])).select_columns(model_columns(spec))
    y, p_str, _ = predict_stream(model, ds.iterator(), spec, 97, __import__("torch").device("cpu"))
    np.testing.assert_allclose(np.sort(p_str), np.sort(p_mem), rtol=1e-5)
    assert sorted(y.tolist()) == sorted(valid.label.numpy().tolist())
    whole = evaluate_train_dir(runs["stream"].train_dir, prep.out_dir)
    cfg_small = json.loads((runs["stream"].train_dir / "config.json").read_text())
    cfg_small["train"]["eval_batch_size"] = 61  # the test split in many small batches
    (runs["stream"].train_dir / "config.json").write_text(json.dumps(cfg_small))
    small = evaluate_train_dir(runs["stream"].train_dir, prep.out_dir)
    assert small["overall"]["auc"] == pytest.approx(whole["overall"]["auc"], abs=1e-6)
    assert small["overall"]["logloss"] == pytest.approx(whole["overall"]["logloss"], abs=1e-6)

    rec = Recommender(str(export_artifact(runs["stream"].train_dir, prep.out_dir, tmp_path / "art")))
    out = rec.recommend_many([Query(user_id="u5", scenario="1", k=3)])[0]
    assert len(out["items"]) == 3 and not out["cold_start"]  # a hashed user known from its interactions
