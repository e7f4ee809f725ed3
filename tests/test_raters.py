"""Item-side behaviour (prepare.history.raters): the raters windows on hand-made rows, no leakage
through prepare (checked against an independent pandas computation), serving's ItemRaters agreeing with
prepare, rater attention's masking, and the clear errors. Serving a raters model scoring as offline
evaluation is in test_history.py (with the other history models)."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from leakage import rows_with_prior

from mcl_ray.core.config import ModelConfig, load_config
from mcl_ray.core.errors import SetupError
from mcl_ray.core.feature_spec import Feature, FeatureSpec
from mcl_ray.data.history import ItemRaters, add_raters, latest_rater_rows, rater_features, sequence_features
from mcl_ray.models.backbones import build_model
from mcl_ray.models.batch import Batch

L, K = 4, 3  # conftest's shop_history prepares with these


def test_add_raters_holds_the_items_strictly_earlier_train_raters_most_recent_first():
    # one item's rows: train raters 4 (t=1), 2 and 3 (t=2), 5 (t=5); a valid rater 9 (t=3), a test rater 8
    group = pa.table({"timestamp": [1, 2, 2, 3, 5, 6], "split": ["train", "train", "train", "valid", "train", "test"],
                      "user_id": [4, 2, 3, 9, 5, 8], "label": [1.0, 0.0, 1.0, 1.0, 1.0, 0.0], "item_id": [7] * 6})
    out = add_raters(group, K, "user_id").to_pydict()
    assert out["raters_user_id"] == [[0, 0, 0],  # nobody before
                                     [4, 0, 0], [4, 0, 0],  # t=2: not itself, nor the other rater of that second
                                     [3, 2, 4],  # valid row: train raters only, most recent first (ties by user id)
                                     [3, 2, 4],  # t=5: itself excluded
                                     [5, 3, 2]]  # never 9 or 8 (valid / test), the last K only
    assert out["raters_label"] == [[0, 0, 0], [2, 0, 0], [2, 0, 0], [2, 1, 2], [2, 1, 2], [2, 2, 1]]


def test_item_raters_of_matches_add_raters_at_any_time_and_after_every_row():
    rng = np.random.default_rng(0)
    n = 60
    rows = pa.table({"item_id": rng.integers(1, 5, n), "timestamp": rng.integers(0, 30, n),
                     "user_id": rng.permutation(n) + 1, "label": rng.integers(0, 2, n).astype(np.float32),
                     "split": ["train"] * n})
    spec = SPEC_R
    raters = ItemRaters(rows, spec)
    for item in range(1, 6):  # item 5 nobody rated: all padding
        g = rows.filter(pc.equal(rows["item_id"], item))
        queries = pa.table({"timestamp": [0, 7, 15, 29, 10**6], "split": ["test"] * 5, "user_id": [0] * 5,
                            "label": np.float32([0] * 5), "item_id": [item] * 5})
        want = add_raters(pa.concat_tables([g.select(queries.column_names), queries]), K, "user_id").slice(len(g))
        got = np.stack([raters.of(np.array([item]), t)[0] for t in [0, 7, 15, 29, None]])  # [5, 2, K]
        assert got[:, 0].tolist() == want["raters_user_id"].to_pylist()
        assert got[:, 1].tolist() == want["raters_label"].to_pylist()


USER = Feature(name="user_id", kind="categorical", source="user", vocab_size=9)
ITEM = Feature(name="item_id", kind="categorical", source="item", vocab_size=7)
SPEC_R = FeatureSpec(features=[USER, ITEM, *sequence_features(ITEM, L, 2), *rater_features(USER, K)],
                     scenario_names=["a", "b"], splits={}, num_rows={}, data_fingerprint="x")


def test_prepared_raters_never_leak_and_serving_builds_the_same(shop_history):
    """Every row's raters equal its item's last K train raters strictly earlier in time, computed
    independently with pandas: never the row itself, a later or same-time row, or a valid/test row. What
    serving and ranking evaluation build (ItemRaters from the train rows, or from each item's last K) agrees."""
    from mcl_ray.data.splits import read_split

    spec, pdir = shop_history.spec, shop_history.out_dir
    assert [f.name for f in spec.raters] == ["raters_user_id", "raters_label"]
    assert spec.raters[0].vocab_size == next(f for f in spec.categorical if f.name == "user_id").vocab_size
    cols = ["user_key", "timestamp", "item_id", "user_id", "label", "raters_user_id", "raters_label"]
    frames = {s: read_split(pdir, spec, s, columns=cols + ["is_synthetic"]).to_pandas()
              for s in ("train", "valid", "test")}
    full = ItemRaters(pa.Table.from_pandas(frames["train"], preserve_index=False), spec)
    checked = earlier_any = 0
    for split, r, prior in rows_with_prior(frames, "item_id", ["user_id", "label"], K):
        n = len(prior)
        assert list(r.raters_user_id[:n]) == prior["user_id"].tolist(), (split, r.item_id, r.timestamp)
        assert list(r.raters_label[:n]) == (prior["label"].astype(int) + 1).tolist()
        assert not any(r.raters_label[n:]) and not any(r.raters_user_id[n:])  # the rest is padding
        served = full.of(np.array([r.item_id]), int(r.timestamp))[0]
        assert served[0].tolist() == list(r.raters_user_id) and served[1].tolist() == list(r.raters_label)
        checked += 1
        earlier_any += n > 0
    assert checked == sum(len(f) for f in frames.values()) and earlier_any > checked // 2
    # ranking evaluation's streamed last-K rows give every item's raters after all train rows, as the full table
    items = np.arange(spec.sequence[0].vocab_size)
    assert np.array_equal(ItemRaters(latest_rater_rows(pdir, spec), spec).of(items), full.of(items))


def rater_batch(n: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    valid = torch.arange(K)[None] < torch.randint(0, K + 1, (n,), generator=g)[:, None]
    raters = torch.stack([torch.randint(1, 9, (n, K), generator=g) * valid,
                          torch.randint(1, 3, (n, K), generator=g) * valid], 1).int()
    return Batch(cat=torch.randint(0, 7, (n, 2), generator=g), num=torch.zeros(n, 0),
                 scenario=torch.randint(0, 2, (n,), generator=g), raters=raters)


@pytest.mark.parametrize("backbone", ["shared_bottom", "mmoe", "star", "m2m"])
def test_rater_attention_masks_padding_scores_rows_alone_and_uses_the_raters(backbone):
    torch.manual_seed(0)
    model = build_model(SPEC_R, ModelConfig(backbone=backbone, dropout=0.0, history={"raters": ["din", "mean"]}))
    model.train(False)
    b = rater_batch(16)
    assert model.inputs.hist_names == ["raters_din", "raters_mean"]
    with torch.no_grad():
        base = model(b)
        junk = b.raters.clone()
        junk[:, 0][junk[:, 1] == 0] = 5  # padding may hold any user id
        assert torch.allclose(model(Batch(cat=b.cat, num=b.num, scenario=b.scenario, raters=junk)), base, atol=1e-6)
        for i in (0, 7, 15):
            assert torch.allclose(model(b.slice(i, i + 1)), base[i:i + 1], atol=1e-6)
        # a real entry's user or label changed moves the row's score
        row = next(i for i in range(16) if b.raters[i, 1, 0] > 0)
        for j in (0, 1):
            other = b.raters.clone()
            other[row, j, 0] = other[row, j, 0] % (8 if j == 0 else 2) + 1
            assert not torch.allclose(model(Batch(cat=b.cat, num=b.num, scenario=b.scenario, raters=other))[row],
                                      base[row])
    model.train(True)
    model(b).sum().backward()
    assert all(p.grad is not None for p in model.inputs.raters.parameters())


def test_raters_config_and_missing_columns_are_clear_errors():
    from mcl_ray.train.trainer import check_ready

    with pytest.raises(ValueError, match="user_feature"):
        load_config("experiments/synthetic_quick.yaml", ["prepare.history={raters: 5, user_feature: gender_x}"])
    cfg = load_config("experiments/synthetic_quick.yaml", ["model.history.raters=[din]"])
    no_raters = SPEC_R.model_copy(update={"features": [f for f in SPEC_R.features if f.kind != "item_sequence"]})
    with pytest.raises(SetupError, match="prepare.history.raters"):
        check_ready(cfg, no_raters)


def test_synthetic_rows_get_the_items_raters_after_every_train_row():
    """An augment-stage row (no time of its own) carries its item's last K train raters."""
    from mcl_ray.llm.augment import rows_table, synthetic_rows

    train = pd.DataFrame({"user_key": ["u1", "u2", "u3", "u1"], "item_key": ["i1", "i1", "i1", "i2"],
                          "timestamp": [30, 10, 20, 5], "user_id": [1, 2, 3, 1], "item_id": [1, 1, 1, 2],
                          "scenario": [0, 1, 0, 1], "label": np.float32([1, 0, 1, 1]),
                          "weight": np.float32(1), "is_synthetic": np.int8(0),
                          **{f.name: [np.zeros(L, np.int32)] * 4 for f in SPEC_R.sequence},
                          **{f.name: [np.zeros(K, np.int32)] * 4 for f in SPEC_R.raters}})
    rows = synthetic_rows([("u3", "i1", 0, 1.0), ("u2", "i2", 1, 0.0)], SPEC_R, train)
    t = rows_table(rows, SPEC_R)
    assert t.schema.field("raters_user_id").type == pa.list_(pa.int32(), K)
    got = t.to_pydict()
    assert got["raters_user_id"] == [[1, 3, 2], [1, 0, 0]]  # i1 by time: u1 (30), u3 (20), u2 (10)
    assert got["raters_label"] == [[2, 2, 1], [2, 0, 0]]


def test_rater_table_own_keeps_the_raters_vectors_apart_from_the_target_users():
    """model.history.rater_table=own: the raters' user vectors come from the pooling's own table, so
    the rater path sends no gradient to the user feature's table (only the target user's row does)."""
    torch.manual_seed(0)
    model = build_model(SPEC_R, ModelConfig(dropout=0.0, history={"raters": ["din", "mean"], "rater_table": "own"}))
    b = rater_batch(16)
    b.cat[:, 0] = 1  # every row's target user is user 1
    model(b).sum().backward()
    user_grad = model.inputs.embeddings[0].weight.grad
    assert user_grad[2:].abs().sum() == 0 and user_grad[1].abs().sum() > 0  # raters 1..8 reach no row of it
    own = model.inputs.raters.users.weight.grad
    assert own[b.raters[:, 0][b.raters[:, 1] > 0].unique()].abs().sum(1).gt(0).all()
