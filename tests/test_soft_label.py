"""Soft labels (prepare.label.soft, train.soft_label): prepare stores the rating scaled to [0, 1], the
ranking loss trains towards (1 - a) * label + a * that, metrics stay on the binary label, and the
settings that cannot work are clear errors. Ordinal cuts (train.ordinal_cuts) read the same column:
one more target per cut of the rating, on the model's logit plus a learned offset."""

import json

import numpy as np
import pytest
import torch

from mcl_ray.core.config import load_config
from mcl_ray.core.errors import SetupError
from mcl_ray.models.batch import Batch
from mcl_ray.train.loop import ranking_loss, soft_target
from mcl_ray.train.ordinal import OrdinalCuts


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
    assert res.spec.soft_label_column == "label_soft" and res.spec.soft_label_range == (1.0, 5.0)
    # a folder prepared before the spec recorded the range: it loads, and the cached prepare records it
    spec_file = res.out_dir / "feature_spec.json"
    old = {k: v for k, v in json.loads(spec_file.read_text()).items() if k != "soft_label_range"}
    spec_file.write_text(json.dumps(old))
    again = prepare(cfg)
    assert again.cached and again.spec.soft_label_range == (1.0, 5.0)
    assert json.loads(spec_file.read_text())["soft_label_range"] == [1.0, 5.0]
    # `mcl-ray train` with another range than the folder was prepared with: warned (and, with cuts, refused)
    from mcl_ray.data.prepare import stale_prepare

    assert stale_prepare(cfg, res.out_dir) is None
    other = load_config("experiments/synthetic_quick.yaml", over + ["prepare.validation.rating_range=[0, 10]"])
    assert "run `mcl-ray prepare` with this config" in stale_prepare(other, res.out_dir)
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

    # ordinal cuts on the same data, under Ray Train with two DDP workers: the learned offsets are
    # kept in the checkpoint's state (where a resumed run reads them), and they moved
    ordinal = load_config("experiments/synthetic_quick.yaml",
                          over + ["train.soft_label=0", "train.ordinal_cuts=[1, 2, 4]", "train.num_workers=2"])
    out = train_one(ordinal, res.out_dir, tmp_path / "train", seed=1)
    assert np.isfinite(out.history[0]["train_loss"]) and 0 < out.metrics["overall"]["auc"] <= 1
    state = json.loads((out.train_dir / "checkpoint" / "state.json").read_text())["state"]
    start = OrdinalCuts([1.0, 2.0, 4.0], (lo, hi), 3.0).offset.tolist()
    assert len(state["ordinal_offsets"]) == 3 and state["ordinal_offsets"] != start


def spec_without_ratings():
    """Prepared data without the label_soft column (prepare.label.soft unset)."""
    from mcl_ray.core.feature_spec import Feature, FeatureSpec

    return FeatureSpec(features=[Feature(name="item_id", kind="categorical", source="item", vocab_size=3)],
                       scenario_names=["a"], splits={}, num_rows={}, data_fingerprint="x")


def test_soft_label_settings_that_cannot_work_are_clear_errors():
    from mcl_ray.core.errors import ConfigError
    from mcl_ray.train.trainer import check_ready

    with pytest.raises((ConfigError, ValueError), match="rating_range"):
        load_config("experiments/synthetic_quick.yaml",
                    ["prepare.label.soft=true", "prepare.validation.rating_range=null"])
    cfg = load_config("experiments/synthetic_quick.yaml", ["train.soft_label=0.3"])
    with pytest.raises(SetupError, match="prepare.label.soft"):
        check_ready(cfg, spec_without_ratings())


def test_ordinal_cuts_target_every_cut_of_the_rating():
    cuts = OrdinalCuts([1.0, 2.0, 4.0], (1.0, 5.0), threshold=3.0)
    assert cuts.offset.tolist() == [2.0, 1.0, -1.0]  # a lower cut is passed more often: it starts higher
    soft = torch.tensor([1.0, 0.75, 0.5, 0.0])  # ratings 5, 4, 3, 1
    logits = torch.tensor([0.5, -0.2, 0.1, 1.0], requires_grad=True)
    loss = cuts(logits, soft)
    target = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 0], [0, 0, 0]])  # rating > 1, > 2, > 4
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.detach()[:, None] + cuts.offset.detach(), target, reduction="none").sum(1)
    assert torch.allclose(loss, expected)
    loss.sum().backward()
    assert logits.grad.abs().min() > 0 and cuts.offset.grad.abs().min() > 0


def test_synthetic_rows_get_no_cut_terms_and_denoising_sees_the_label_loss():
    """Augment rows have no rating (their label_soft is their label): the cuts would read a liked
    synthetic row as a 5. They keep the label's loss alone, which is also what denoising ranks."""
    cuts = OrdinalCuts([1.0, 2.0, 4.0], (1.0, 5.0), threshold=3.0)
    b = Batch(cat=torch.zeros(2, 1, dtype=torch.long), num=torch.zeros(2, 0), scenario=torch.zeros(2, dtype=torch.long),
              label=torch.tensor([1.0, 1.0]), soft=torch.tensor([1.0, 1.0]), synthetic=torch.tensor([False, True]))
    logits = torch.tensor([0.3, 0.3])
    loss, label_loss = ranking_loss(logits, b, 0.0, cuts, 0.5)
    assert torch.allclose(label_loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, b.label,
                                                                                           reduction="none"))
    assert loss[1] == label_loss[1] and loss[0] > label_loss[0]
    assert torch.allclose(loss[0] - label_loss[0], 0.5 * cuts(logits, b.soft)[0])
    assert torch.equal(ranking_loss(logits, b, 0.0)[0], label_loss)  # no cuts: the label's loss


def test_ordinal_cuts_order_ratings_the_label_alone_cannot():
    """Free scores for ratings 1-5 fitted with the label's loss alone leave a 5 level with a 4 and a
    1 level with a 3; with the cuts, the scores follow the ratings."""
    soft = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).repeat(20)  # ratings 1-5
    label = (soft > 0.5).float()

    def fit(cuts: OrdinalCuts | None) -> torch.Tensor:
        torch.manual_seed(0)
        score = torch.nn.Parameter(torch.zeros(5))
        opt = torch.optim.Adam([score] + ([cuts.offset] if cuts else []), lr=0.05)
        for _ in range(300):
            s = score.repeat(20)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(s, label, reduction="none")
            if cuts is not None:
                loss = loss + 0.5 * cuts(s, soft)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        return score.detach()

    alone = fit(None)
    assert torch.isclose(alone[3], alone[4], atol=1e-3) and torch.isclose(alone[0], alone[2], atol=1e-3)
    ordered = fit(OrdinalCuts([1.0, 2.0, 4.0], (1.0, 5.0), threshold=3.0))
    assert (ordered.diff() > 0.1).all(), ordered


def _sync_on_rank(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cuts = OrdinalCuts([1.0, 4.0], (1.0, 5.0), threshold=3.0)
    cuts.offset.grad = torch.tensor([1.0, 2.0]) * (rank + 1)  # each rank's own gradient
    cuts.sync_grads(world=2)
    torch.save(cuts.offset.grad, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ordinal_offsets_get_the_mean_gradient_of_every_rank(tmp_path):
    """The offsets live outside DDP's model, so each step averages their gradients itself (real gloo,
    two processes): otherwise the ranks' offsets would drift apart."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_sync_on_rank, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        grad = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(grad, torch.tensor([1.5, 3.0]))


def test_ordinal_cut_settings_that_cannot_work_are_clear_errors():
    from mcl_ray.core.errors import ConfigError
    from mcl_ray.train.trainer import check_ready

    base = ["prepare.label.soft=true"]
    for over, match in (("train.ordinal_cuts=[3]", "cut 3.0 is the label's own threshold"),
                        ("train.ordinal_cuts=[0.5]", r"cut 0.5 is outside \[1.0, 5.0\)"),
                        ("train.ordinal_cuts=[5]", r"cut 5.0 is outside \[1.0, 5.0\)"),
                        ("train.ordinal_cuts=[2, 2]", "listed twice"),
                        ("prepare.label.op=ge", "needs prepare.label.op: gt")):
        with pytest.raises((ConfigError, ValueError), match=match):
            load_config("experiments/synthetic_quick.yaml", base + ["train.ordinal_cuts=[1, 2, 4]", over])
    with pytest.raises((ConfigError, ValueError), match="prepare.label.soft"):
        load_config("experiments/synthetic_quick.yaml", ["train.ordinal_cuts=[1, 2, 4]"])
    cfg = load_config("experiments/synthetic_quick.yaml", base + ["train.ordinal_cuts=[1, 2, 4]"])
    with pytest.raises(SetupError, match="prepare.label.soft"):
        check_ready(cfg, spec_without_ratings())
    # ratings prepared on another scale: the cuts would be scaled wrongly
    spec = spec_without_ratings().model_copy(update={"soft_label_column": "label_soft",
                                                     "soft_label_range": (0.0, 10.0)})
    with pytest.raises(SetupError, match=r"scaled by rating_range \[0.0, 10.0\], this config says \[1.0, 5.0\]"):
        check_ready(cfg, spec)
    check_ready(cfg, spec.model_copy(update={"soft_label_range": (1.0, 5.0)}))  # the same scale: ready
    assert OrdinalCuts.from_config(cfg, spec).cuts.tolist() == pytest.approx([0.1, 0.2, 0.4])  # the data's scale
