"""Behaviour-history features: the windows on hand-made rows, no leakage through prepare (checked
against an independent pandas computation), target attention's masking, and serving a history
model scoring as offline evaluation does."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from leakage import rows_with_prior

from mcl_ray.core.config import ModelConfig, load_config
from mcl_ray.core.errors import ConfigError, SetupError
from mcl_ray.core.feature_spec import Feature, FeatureSpec
from mcl_ray.data.history import add_history, label_ids, sequence_features, windows
from mcl_ray.models.backbones import build_model
from mcl_ray.models.batch import Batch

L = 4  # the history length of conftest's shop_history


def test_windows_hold_only_strictly_earlier_train_rows_most_recent_first():
    # one user's train rows, sorted by time: items 11..15 at t = 10, 20, 20, 30, 40
    ts = np.array([10, 20, 20, 30, 40])
    item, label, scen = np.array([11, 12, 13, 14, 15]), np.array([1, 0, 1, 1, 0]), np.array([0, 1, 1, 2, 0])
    items, labels, scens = windows(ts, item, label_ids(label, None), scen, np.array([5, 10, 20, 25, 40, 99]), L)
    assert items.tolist() == [[0, 0, 0, 0],  # nothing earlier
                              [0, 0, 0, 0],  # t=10: the row at 10 itself is not earlier
                              [11, 0, 0, 0],  # t=20: the two rows of the same second are left out
                              [13, 12, 11, 0],  # most recent first (ties in train order)
                              [14, 13, 12, 11],
                              [15, 14, 13, 12]]  # the last L only
    assert labels.tolist()[3] == [2, 1, 2, 0]  # 0 padding, 1 negative, 2 positive
    assert scens.tolist()[3] == [1, 1, 0, 0]


def test_add_history_reads_train_rows_only():
    group = pa.table({"timestamp": [1, 2, 3, 4], "split": ["train", "valid", "test", "train"],
                      "item_id": [7, 8, 9, 6], "label": [1.0, 1.0, 1.0, 0.0], "scenario": [0, 0, 0, 0]})
    out = add_history(group, 3, "item_id").to_pydict()
    assert out["hist_item_id"] == [[0, 0, 0], [7, 0, 0], [7, 0, 0], [7, 0, 0]]  # never 8 or 9 (valid/test)
    assert out["hist_label"] == [[0, 0, 0], [2, 0, 0], [2, 0, 0], [2, 0, 0]]


def test_add_history_with_label_buckets_holds_the_bucket_ids():
    group = pa.table({"timestamp": [1, 2, 3], "split": ["train", "train", "train"], "item_id": [7, 8, 9],
                      "label": [1.0, 0.0, 1.0], "label_bucket": pa.array([5, 2, 4], pa.int8()), "scenario": [0, 0, 0]})
    out = add_history(group, 3, "item_id", bucketed=True).to_pydict()
    assert out["hist_label"] == [[0, 0, 0], [5, 0, 0], [2, 5, 0]]  # the ratings' buckets, not 1 / 2


def test_prepared_history_never_leaks(shop_history):
    """Every row's history equals the user's last L train rows strictly earlier in time, computed
    independently with pandas: never the row itself, a later or same-time row, or a valid/test row."""
    from mcl_ray.data.splits import read_split

    spec, pdir = shop_history.spec, shop_history.out_dir
    assert [f.name for f in spec.sequence] == ["hist_item_id", "hist_label", "hist_scenario"]
    cols = ["user_key", "timestamp", "item_id", "label", "scenario", "hist_item_id", "hist_label", "hist_scenario"]
    frames = {s: read_split(pdir, spec, s, columns=cols).to_pandas() for s in ("train", "valid", "test")}
    checked = earlier_any = 0
    for split, r, prior in rows_with_prior(frames, "user_key", ["item_id"], L):
        n = len(prior)
        assert list(r.hist_item_id[:n]) == prior["item_id"].tolist(), (split, r.user_key, r.timestamp)
        assert list(r.hist_label[:n]) == (prior["label"].astype(int) + 1).tolist()
        assert list(r.hist_scenario[:n]) == prior["scenario"].tolist()
        assert not any(r.hist_label[n:]) and not any(r.hist_item_id[n:])  # the rest is padding
        checked += 1
        earlier_any += n > 0
    assert checked == sum(len(f) for f in frames.values()) and earlier_any > checked // 2
    # valid and test rows do have histories, from train rows only (the independent check above)
    assert frames["test"]["hist_label"].map(lambda x: x[0] > 0).mean() > 0.5


def test_prepared_label_buckets_hold_each_earlier_train_rows_rating_bucket(tmp_path, ray_cluster):
    """prepare.history.label_buckets: every row keeps its rating's bucket, and a history holds the
    buckets of the user's earlier train rows (checked with pandas); the spec names the column."""
    from mcl_ray.data.prepare import prepare, prepare_fingerprint
    from mcl_ray.data.splits import read_split

    over = [f"run_dir={tmp_path}", "data.num_interactions=6000", "data.num_users=300"]
    cfg = load_config("experiments/synthetic_quick.yaml",
                      over + [f"prepare.history={{length: {L}, label_buckets: [1.5, 2.5, 3.5, 4.5]}}"])
    plain = load_config("experiments/synthetic_quick.yaml", over + [f"prepare.history={{length: {L}}}"])
    assert prepare_fingerprint(cfg) != prepare_fingerprint(plain)
    res = prepare(cfg)
    spec = res.spec
    lab = next(f for f in spec.sequence if f.name == "hist_label")
    assert (lab.vocab_size, lab.ids_of) == (6, "label_bucket") and spec.sequence[0].name == "hist_item_id"
    cols = ["user_key", "timestamp", "item_id", "label", "label_bucket", "hist_label"]
    frames = {s: read_split(res.out_dir, spec, s, columns=cols).to_pandas() for s in ("train", "test")}
    train = frames["train"].sort_values(["user_key", "timestamp", "item_id"])
    # synthetic ratings: 4-5 clicked, 1-3 not; the label is rating > 3
    assert set(train["label_bucket"]) == {1, 2, 3, 4, 5}
    assert ((train["label_bucket"] >= 4) == (train["label"] > 0)).all()
    by_user = dict(list(train.groupby("user_key")))
    for df in frames.values():
        for r in df.itertuples():
            g = by_user.get(r.user_key, train.iloc[:0])
            prior = g[g["timestamp"] < r.timestamp].iloc[::-1].head(L)
            assert list(r.hist_label[:len(prior)]) == prior["label_bucket"].tolist()


def test_label_buckets_must_ascend():
    with pytest.raises(ConfigError, match="strictly ascending"):
        load_config("experiments/synthetic_quick.yaml", ["prepare.history={length: 4, label_buckets: [2.5, 1.5]}"])


SPEC = FeatureSpec(features=[Feature(name="user_id", kind="categorical", source="user", vocab_size=9),
                             Feature(name="item_id", kind="categorical", source="item", vocab_size=7),
                             *sequence_features(Feature(name="item_id", kind="categorical", source="item",
                                                        vocab_size=7), L, 2)],
                   scenario_names=["a", "b"], splits={}, num_rows={}, data_fingerprint="x")


def hist_batch(n: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    length = torch.randint(0, L + 1, (n,), generator=g)
    valid = torch.arange(L)[None] < length[:, None]
    hist = torch.stack([torch.randint(1, 7, (n, L), generator=g) * valid,
                        torch.randint(1, 3, (n, L), generator=g) * valid,
                        torch.randint(0, 2, (n, L), generator=g) * valid], 1).int()
    return Batch(cat=torch.randint(0, 7, (n, 2), generator=g), num=torch.zeros(n, 0),
                 scenario=torch.randint(0, 2, (n,), generator=g), hist=hist)


def assert_masks_padding_and_scores_rows_alone(model: torch.nn.Module, b: Batch) -> torch.Tensor:
    """Padding (label 0) may hold anything without moving a score, and a row alone scores as it does
    in the batch; returns the batch's scores."""
    base = model(b)
    junk = b.hist.clone()
    pad = junk[:, 1] == 0
    junk[:, 0][pad] = 5
    junk[:, 2][pad] = 1
    assert torch.allclose(model(Batch(cat=b.cat, num=b.num, scenario=b.scenario, hist=junk)), base, atol=1e-6)
    for i in (0, 7, 15):
        assert torch.allclose(model(b.slice(i, i + 1)), base[i:i + 1], atol=1e-6)
    return base


@pytest.mark.parametrize("backbone", ["shared_bottom", "mmoe", "star", "m2m"])
def test_target_attention_masks_padding_and_scores_rows_alone(backbone):
    torch.manual_seed(0)
    model = build_model(SPEC, ModelConfig(backbone=backbone, dropout=0.0, history={"pooling": ["din", "mean"]}))
    model.train(False)
    b = hist_batch(16)
    with torch.no_grad():
        base = assert_masks_padding_and_scores_rows_alone(model, b)
        # and the history is used: a row with one real entry changed scores differently
        row = next(i for i in range(16) if b.hist[i, 1, 0] > 0)
        other = b.hist.clone()
        other[row, 0, 0] = other[row, 0, 0] % 6 + 1
        assert not torch.allclose(model(Batch(cat=b.cat, num=b.num, scenario=b.scenario, hist=other))[row],
                                  base[row])


def test_label_bucket_histories_embed_each_bucket_and_keep_the_masking():
    item = Feature(name="item_id", kind="categorical", source="item", vocab_size=7)
    seq = sequence_features(item, L, 2, [1.5, 2.5, 3.5, 4.5])
    spec = SPEC.model_copy(update={"features": [*SPEC.features[:2], *seq]})
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(dropout=0.0, history={"pooling": ["din", "mean"]}))
    model.train(False)
    assert model.inputs.history.label.num_embeddings == 6
    b = hist_batch(16)
    b.hist[:, 1] = b.hist[:, 1] * 2 + (b.hist[:, 1] > 0)  # labels 1, 2 -> buckets 3, 5 (padding stays 0)
    with torch.no_grad():
        base = assert_masks_padding_and_scores_rows_alone(model, b)
        row = next(i for i in range(16) if b.hist[i, 1, 0] > 0)
        other = b.hist.clone()
        other[row, 1, 0] = 4 if other[row, 1, 0] != 4 else 1  # another rating bucket, same item
        assert not torch.allclose(model(Batch(cat=b.cat, num=b.num, scenario=b.scenario, hist=other))[row], base[row])


def test_history_item_text_compares_items_by_content_and_keeps_the_masking():
    """model.history.item_text: an item's text vector enters its history entries and DIN's query
    through the history's own projection; padding stays masked, a row alone scores as in a batch."""
    from mcl_ray.models.blocks import HistoryPooling
    from mcl_ray.models.text import TextFields

    spec = SPEC.model_copy(update={"features": [*SPEC.features, Feature(name="item_text", kind="text_embedding",
                                                                         source="item", dim=6)]})
    cfg = ModelConfig(backbone="shared_bottom", dropout=0.0, text={"mode": "frozen", "fields": ["item"]},
                      history={"pooling": ["din", "mean"], "item_text": True})
    torch.manual_seed(0)
    model = build_model(spec, cfg)
    model.train(False)
    text = next(m for m in model.modules() if isinstance(m, TextFields)).tables["item"]
    text.weight.data.normal_()  # what the encode stage's embeddings fill in
    b = hist_batch(16)
    with torch.no_grad():
        base = assert_masks_padding_and_scores_rows_alone(model, b)
        # the text is used: changing the text of an item some history holds (not the target) moves its rows
        row = next(i for i in range(16) if b.hist[i, 1, 0] > 0 and b.hist[i, 0, 0] != b.cat[i, 1])
        text.weight.data[int(b.hist[row, 0, 0])] += 1.0
        assert not torch.allclose(model(b)[row], base[row])
    model.train(True)
    model(b).sum().backward()
    pool = next(m for m in model.modules() if isinstance(m, HistoryPooling))
    assert text.weight.grad is None and pool.text_proj.weight.grad.abs().sum() > 0  # frozen; the projection learns
    with pytest.raises(ValueError, match="item_text"):
        ModelConfig(history={"pooling": ["din"], "item_text": True})  # text off


@pytest.mark.parametrize("hidden", [[64, 32], [16]])
def test_din_weights_equal_the_attention_mlp_over_q_k_q_minus_k_q_times_k(hidden):
    """The factored first layer (q part once per row) is DIN's MLP over [q, k, q-k, q*k], gradients too."""
    from mcl_ray.models.blocks import HistoryPooling

    torch.manual_seed(0)
    pool = HistoryPooling(SPEC, 8, ModelConfig(history={"pooling": ["din"], "attention_hidden": hidden}).history)
    q, k = torch.randn(5, 8, requires_grad=True), torch.randn(5, L, 8, requires_grad=True)
    qe = q.unsqueeze(1).expand_as(k)
    plain = pool.attention(torch.cat([qe, k, qe - k, qe * k], dim=-1))  # [5, L, 1]
    factored = pool.din_weights(q, k)
    assert factored.shape == plain.shape == (5, L, 1)
    assert torch.allclose(factored, plain, atol=1e-6)
    g_plain = torch.autograd.grad(plain.sum(), [q, k, *pool.parameters()], allow_unused=True)
    g_fact = torch.autograd.grad(factored.sum(), [q, k, *pool.parameters()], allow_unused=True)
    for a, b in zip(g_plain, g_fact):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5))


def test_history_pooling_without_history_columns_is_a_clear_error():
    from mcl_ray.train.trainer import check_ready

    cfg = load_config("experiments/synthetic_quick.yaml", ["model.history.pooling=[din]"])
    spec = FeatureSpec(features=SPEC.features[:2], scenario_names=["a"], splits={}, num_rows={}, data_fingerprint="x")
    with pytest.raises(SetupError, match="prepare.history"):
        check_ready(cfg, spec)
    with pytest.raises(ValueError, match="item_feature"):
        load_config("experiments/synthetic_quick.yaml", ["prepare.history={item_feature: title}"])


def test_history_needs_a_timestamp():
    from mcl_ray.core.config import PrepareConfig
    from mcl_ray.data.fuse import FusionError, plan_fusion

    cfg = PrepareConfig(history={"length": 5}, scenario={"column": "surface"}, label={"column": "clicked", "op": "binary"},
                        categorical=[{"name": "user_id"}, {"name": "item_id"}], text=None)
    with pytest.raises(FusionError, match="prepare.history"):
        plan_fusion(cfg, ["user_id", "item_id", "clicked", "surface"], None, None, {"a": 0})


@pytest.mark.parametrize("history", ["{length: 8}", "{length: 8, label_buckets: [1.5, 2.5, 3.5, 4.5]}",
                                     "{length: 8, raters: 6}"], ids=["binary", "rating_buckets", "raters"])
def test_serving_a_history_model_scores_as_offline_evaluation(tmp_path, ray_cluster, history):
    """The served model builds each request's history (and each candidate item's raters) from the
    artifact (as of the row's time) and scores the test rows exactly as evaluation does from the prepared
    split (with the binary label or the rating buckets in the history; with the items' raters)."""
    from mcl_ray.artifact import export_artifact
    from mcl_ray.data.prepare import prepare
    from mcl_ray.data.splits import read_split
    from mcl_ray.evaluate.evaluate import predict
    from mcl_ray.models.weights import MODEL, load_trained
    from mcl_ray.serve.recommender import Query, Recommender
    from mcl_ray.train.trainer import train_one

    cfg = load_config("experiments/synthetic_quick.yaml", [
        f"run_dir={tmp_path}", "data.num_interactions=20000", "train.epochs=2", "evaluate.ranking_users=50",
        "train.num_workers=0",  # the loop in the driver: Ray Train is not under test here
        "train.batch_size=1024", "model.hidden=[32]", "model.tower_hidden=[16]", f"prepare.history={history}",
        "model.history.pooling=[din, mean]", *(["model.history.raters=[din]"] if "raters" in history else [])])
    res = prepare(cfg)
    tdir = tmp_path / "train" / "seed_1"
    out = train_one(cfg, res.out_dir, tdir, seed=1)
    assert out.metrics["overall"]["auc"] > 0.5
    art = export_artifact(tdir, res.out_dir, tmp_path / "artifact")
    rec = Recommender(art)

    test = read_split(res.out_dir, res.spec, "test", extra=["user_key", "item_key", "timestamp"]).slice(0, 40)
    offline = predict(load_trained(res.spec, cfg.model, tdir / MODEL), Batch.from_table(test, res.spec), 64,
                      torch.device("cpu"))
    rows = test.to_pylist()
    served = [rec.score(Query(user_id=r["user_key"], scenario=res.spec.scenario_names[r["scenario"]],
                              item_ids=[r["item_key"]], as_of=r["timestamp"]))["scores"][0]["score"] for r in rows]
    assert np.allclose(served, offline, atol=1e-5)
    # without as_of the whole train history is used: some scores move
    now = [rec.score(Query(user_id=r["user_key"], scenario=res.spec.scenario_names[r["scenario"]],
                           item_ids=[r["item_key"]]))["scores"][0]["score"] for r in rows]
    assert not np.allclose(now, offline, atol=1e-5)
    assert pd.Series(rows).size == 40

    # explanations attribute to the history fields too, scored with the same history
    from mcl_ray.serve.explain import Explainer, ExplainQuery

    r = rows[0]
    scen = res.spec.scenario_names[r["scenario"]]
    ex = Explainer(rec).explain(ExplainQuery(user_id=r["user_key"], scenario=scen, item_id=r["item_key"],
                                             as_of=r["timestamp"]))
    fields = {f["field"]: f for f in ex["fields"]}
    assert fields["history_din"]["source"] == "history" and fields["history_mean"]["value"] == "behaviour history"
    if "raters" in history:
        assert fields["raters_din"]["source"] == "history" and fields["raters_din"]["value"] == "behaviour history"
    assert abs(1 / (1 + np.exp(-ex["logit"])) - served[0]) < 1e-5


def test_synthetic_rows_get_the_users_whole_train_history():
    """An augment-stage row (no time of its own) carries its user's last L train rows, as fixed-size
    lists like the train split's."""
    from mcl_ray.llm.augment import rows_table, synthetic_rows

    spec = SPEC.model_copy(update={"features": [*SPEC.features[:2], *SPEC.sequence]})
    train = pd.DataFrame({"user_key": ["u1", "u1", "u1", "u2"], "item_key": ["i1", "i2", "i3", "i1"],
                          "timestamp": [30, 10, 20, 5], "user_id": [1, 1, 1, 2], "item_id": [1, 2, 3, 1],
                          "scenario": [0, 1, 0, 1], "label": np.float32([1, 0, 1, 1]),
                          "weight": np.float32(1), "is_synthetic": np.int8(0),
                          "hist_item_id": [np.zeros(L, np.int32)] * 4, "hist_label": [np.zeros(L, np.int8)] * 4,
                          "hist_scenario": [np.zeros(L, np.int16)] * 4})
    rows = synthetic_rows([("u1", "i3", 0, 1.0), ("u2", "i2", 1, 0.0)], spec, train)
    t = rows_table(rows, spec)
    assert t.schema.field("hist_item_id").type == pa.list_(pa.int32(), L)
    got = t.to_pydict()
    assert got["hist_item_id"] == [[1, 3, 2, 0], [1, 0, 0, 0]]  # u1 by time: i1 (30), i3 (20), i2 (10)
    assert got["hist_label"] == [[2, 2, 1, 0], [2, 0, 0, 0]]
    assert got["hist_scenario"] == [[0, 0, 1, 0], [1, 0, 0, 0]] and got["is_synthetic"] == [1, 1]


def test_history_encoder_layers_mask_padding_score_rows_alone_and_see_the_other_entries():
    """model.history.encoder_layers: a transformer layer over the entries before the pooling; padding
    stays masked (a row with no history too: no NaN), a row alone scores as in a batch, and an entry's
    vector now depends on the other entries (mean pooling alone would not move otherwise)."""
    from mcl_ray.models.blocks import HistoryPooling

    torch.manual_seed(0)
    cfg = ModelConfig(dropout=0.0, history={"pooling": ["din", "mean"], "encoder_layers": 1})
    model = build_model(SPEC, cfg)
    model.train(False)
    b = hist_batch(16)
    b.hist[3] = 0  # a row with no history
    with torch.no_grad():
        base = assert_masks_padding_and_scores_rows_alone(model, b)
        assert torch.isfinite(base).all()
    pool = next(m for m in model.modules() if isinstance(m, HistoryPooling))
    k = torch.randn(2, L, 16)
    mask = torch.ones(2, L, 1)
    mask[1, 2:] = 0
    out = pool.encode(k, mask)
    k2 = k.clone()
    k2[:, 1] += 1.0  # another entry changed: entry 0's encoding moves
    assert not torch.allclose(pool.encode(k2, mask)[:, 0], out[:, 0])
    assert (out[1, 2:] == 0).all()
    model.train(True)
    model(b).sum().backward()
    assert all(p.grad is not None for p in pool.encoder.parameters()) and pool.position.weight.grad is not None
    with pytest.raises(ValueError, match="model.history.pooling"):
        ModelConfig(history={"encoder_layers": 1})  # nothing to pool the encoded entries
