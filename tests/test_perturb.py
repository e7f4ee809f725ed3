"""Embedding perturbation in training: FGM's step has the configured norm and points along the
gradient, random noise has the norm, PGD stays in the ball and finds the FGM optimum of a linear
model; the knobs are searchable by tune; a DDP run trains with it."""

import json

import pytest
import torch
import torch.nn.functional as F

from mcl_ray.core.config import load_config
from mcl_ray.core.feature_spec import Feature, FeatureSpec
from mcl_ray.models.batch import Batch
from mcl_ray.models.blocks import InputLayer
from mcl_ray.train.perturb import clear, set_deltas


class Linear(torch.nn.Module):
    """InputLayer -> one linear logit: the loss is convex in the input, so FGM's step is optimal."""

    def __init__(self):
        super().__init__()
        spec = FeatureSpec(features=[Feature(name="a", kind="categorical", source="user", vocab_size=5),
                                     Feature(name="b", kind="categorical", source="item", vocab_size=7)],
                           scenario_names=["s"], splits={}, num_rows={}, data_fingerprint="x")
        self.inputs = InputLayer(spec, 4)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, b: Batch) -> torch.Tensor:
        return self.out(self.inputs(b).flatten(1)).squeeze(1)


def setup():
    torch.manual_seed(0)
    model = Linear()
    for e in model.inputs.embeddings:
        torch.nn.init.normal_(e.weight)
    b = Batch(cat=torch.randint(0, 5, (16, 2)), num=torch.zeros(16, 0), scenario=torch.zeros(16, dtype=torch.long),
              label=(torch.rand(16) > 0.5).float())
    model.inputs.capture = True

    def loss_of():
        return F.binary_cross_entropy_with_logits(model(b), b.label, reduction="sum")
    return model, loss_of


def test_fgm_has_the_norm_and_points_along_the_gradient():
    model, loss_of = setup()
    loss = loss_of()
    grad = torch.autograd.grad(loss, model.inputs.last, retain_graph=True)[0]
    set_deltas("fgm", 0.3, 1, model, loss_of, loss)
    d = model.inputs.delta
    assert torch.allclose(d.flatten(1).norm(dim=1), torch.full((16,), 0.3), atol=1e-6)
    assert torch.allclose(F.cosine_similarity(d.flatten(1), grad.flatten(1)), torch.ones(16), atol=1e-6)
    adv = loss_of()
    assert adv > loss  # a step up the loss
    clear([model.inputs])
    assert model.inputs.delta is None and torch.equal(loss_of(), loss)  # cleared: the clean model again


def test_random_noise_has_the_norm_and_pgd_stays_in_the_ball():
    model, loss_of = setup()
    loss = loss_of()
    set_deltas("random", 0.2, 1, model, loss_of, loss)
    noise = model.inputs.delta
    assert torch.allclose(noise.flatten(1).norm(dim=1), torch.full((16,), 0.2), atol=1e-6)
    clear([model.inputs])
    loss = loss_of()
    set_deltas("fgm", 0.5, 1, model, loss_of, loss)
    fgm = loss_of().item()
    clear([model.inputs])
    loss = loss_of()
    set_deltas("pgd", 0.5, 5, model, loss_of, loss)
    assert (model.inputs.delta.flatten(1).norm(dim=1) <= 0.5 + 1e-6).all()
    # for a linear logit the loss's maximum on the ball is FGM's point: PGD's steps reach it
    assert loss_of().item() == pytest.approx(fgm, rel=1e-4)
    clear([model.inputs])
    loss = loss_of()
    set_deltas("pgd", 0.5, 1, model, loss_of, loss)  # one step of size 2 eps: still projected on the ball
    assert (model.inputs.delta.flatten(1).norm(dim=1) <= 0.5 + 1e-6).all()


def test_llm_ranker_has_no_embeddings_to_perturb():
    from mcl_ray.core.config import ConfigError

    with pytest.raises(ConfigError, match="llm_ranker has none"):
        load_config("experiments/ml1m_swr_quick.yaml", ["model.backbone=llm_ranker", "model.text.mode=off",
                                                        "train.perturbation=fgm"])


def test_perturbation_is_searchable():
    from ray.tune.search.sample import Categorical, Float

    from mcl_ray.tune.space import search_space, trial_config

    cfg = load_config("experiments/ml1m_swr_quick.yaml", [
        'tune.space={"train.perturbation": {"type": "choice", "values": ["none", "fgm"]}, '
        '"train.perturbation_eps": {"type": "loguniform", "low": 0.01, "high": 1.0}}'])
    sp = search_space(cfg.tune)
    assert isinstance(sp["train.perturbation"], Categorical) and isinstance(sp["train.perturbation_eps"], Float)
    t = trial_config(cfg.model_dump(mode="json"), {"train.perturbation": "fgm", "train.perturbation_eps": 0.05})
    assert (t.train.perturbation, t.train.perturbation_eps) == ("fgm", 0.05)


@pytest.mark.ray
def test_ddp_training_with_pgd(tmp_path, ray_cluster):
    """Two DDP workers, PGD: the clean pass under no_sync, the perturbed one all-reduced."""
    from mcl_ray.data.prepare import prepare
    from mcl_ray.train.trainer import train_one

    cfg = load_config("experiments/synthetic_quick.yaml", [
        f"run_dir={tmp_path}", "data.num_interactions=12000", "train.epochs=2", "train.num_workers=2",
        "train.cpus_per_worker=1", "train.perturbation=pgd", "train.perturbation_eps=0.05", "evaluate.ranking_users=0"])
    pdir = prepare(cfg).out_dir
    res = train_one(cfg, pdir, tmp_path / "pgd", seed=1)
    h = res.history
    assert [x["world_size"] for x in h] == [2, 2] and h[1]["train_loss"] < h[0]["train_loss"]  # it learns
    assert res.metrics["overall"]["auc"] > 0.52
    assert json.loads((tmp_path / "pgd" / "config.json").read_text())["train"]["perturbation"] == "pgd"
