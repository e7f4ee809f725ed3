"""Soft labels (prepare.label.soft, train.soft_label): prepare stores the rating scaled to [0, 1], the
ranking loss trains towards (1 - a) * label + a * that, metrics stay on the binary label, and the
settings that cannot work are clear errors."""

import numpy as np
import pytest
import torch

from mcl_ray.core.config import load_config
from mcl_ray.core.errors import SetupError
from mcl_ray.models.batch import Batch
from mcl_ray.train.loop import soft_target


def test_soft_target_mixes_the_label_with_the_scaled_rating():
    b = Batch(cat=torch.zeros(3, 1, dtype=torch.long), num=torch.zeros(3, 0), scenario=torch.zeros(3, dtype=torch.long),
              label=torch.tensor([1.0, 0.0, 0.0]), soft=torch.tensor([1.0, 0.5, 0.0]))  # ratings 5, 3, 1
    assert torch.equal(soft_target(b, 0.0), b.label)
    assert torch.allclose(soft_target(b, 0.2), torch.tensor([1.0, 0.1, 0.0]))
    assert torch.allclose(soft_target(b, 1.0), b.soft)


def test_prepare_stores_the_scaled_rating_and_training_uses_it(tmp_path, ray_cluster):
    from mcl_ray.data.prepare import prepare
    from mcl_ray.data.splits import read_split
    from mcl_ray.train.trainer import train_one

    over = [f"run_dir={tmp_path}", "data.num_interactions=6000", "train.epochs=1", "evaluate.ranking_users=20",
            "train.num_workers=0", "model.hidden=[16]", "model.tower_hidden=[8]", "prepare.label.soft=true",
            "train.soft_label=0.3"]
    cfg = load_config("experiments/synthetic_quick.yaml", over)
    res = prepare(cfg)
    assert res.spec.soft_label_column == "label_soft"
    t = read_split(res.out_dir, res.spec, "train", extra=["user_key", "item_key"]).to_pandas()
    lo, hi = cfg.prepare.validation.rating_range
    assert t["label_soft"].between(0, 1).all() and t["label_soft"].nunique() > 2
    # the label is rating > 3, so every positive's soft label is above (3 - lo) / (hi - lo), every negative's at most
    cut = (3 - lo) / (hi - lo)
    assert (t.loc[t["label"] > 0, "label_soft"] > cut).all() and (t.loc[t["label"] == 0, "label_soft"] <= cut).all()
    assert np.allclose(Batch.from_table(read_split(res.out_dir, res.spec, "train"), res.spec).soft.numpy(),
                       t["label_soft"].to_numpy())
    out = train_one(cfg, res.out_dir, tmp_path / "train", seed=1)
    assert np.isfinite(out.history[0]["train_loss"]) and 0 < out.metrics["overall"]["auc"] <= 1


def test_soft_label_settings_that_cannot_work_are_clear_errors():
    from mcl_ray.core.errors import ConfigError
    from mcl_ray.core.feature_spec import Feature, FeatureSpec
    from mcl_ray.train.trainer import check_ready

    with pytest.raises((ConfigError, ValueError), match="rating_range"):
        load_config("experiments/synthetic_quick.yaml",
                    ["prepare.label.soft=true", "prepare.validation.rating_range=null"])
    cfg = load_config("experiments/synthetic_quick.yaml", ["train.soft_label=0.3"])
    spec = FeatureSpec(features=[Feature(name="item_id", kind="categorical", source="item", vocab_size=3)],
                       scenario_names=["a"], splits={}, num_rows={}, data_fingerprint="x")
    with pytest.raises(SetupError, match="prepare.label.soft"):
        check_ready(cfg, spec)
