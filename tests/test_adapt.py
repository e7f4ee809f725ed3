"""Adding a scenario from few rows (`mcl-ray adapt`): the scenario slots of every backbone, Reptile
against a hand computation, and a held-out scenario adapted end to end, changing only its own
parameters and served from the adapted artifact."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mcl_ray.core.config import AdaptConfig, ModelConfig, load_config
from mcl_ray.core.feature_spec import Feature, FeatureSpec
from mcl_ray.models.backbones import build_model
from mcl_ray.models.batch import Batch
from mcl_ray.models.slots import ScenarioSlots
from mcl_ray.train.adapt import reptile

SPEC = FeatureSpec(features=[Feature(name="user_id", kind="categorical", source="user", vocab_size=9),
                             Feature(name="item_id", kind="categorical", source="item", vocab_size=7),
                             Feature(name="year", kind="numeric", source="item")],
                   scenario_names=["a", "b", "c"], splits={}, num_rows={}, data_fingerprint="x")


def rows(n: int, scenario: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(cat=torch.randint(0, 7, (n, 2), generator=g), num=torch.randn(n, 1, generator=g),
                 scenario=torch.full((n,), scenario), label=(torch.rand(n, generator=g) > 0.5).float(),
                 weight=torch.ones(n))


@pytest.mark.parametrize("backbone", ["single", "shared_bottom", "mmoe", "ple", "star", "pepnet", "m2m"])
def test_a_scenario_slot_is_exactly_what_its_rows_depend_on(backbone):
    """Changing scenario 1's parameters changes the scores of its rows and of no other row; inside
    `only`, no other parameter gets a gradient; afterwards every parameter is trainable again."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, dropout=0.0, text={"mode": "off"})
    model = build_model(SPEC, cfg).train(False)
    slots = ScenarioSlots(SPEC, cfg)
    batch = Batch.concat([rows(8, s, seed=s) for s in range(3)])
    before = model(batch).detach()
    slots.set(model, 1, [v + torch.randn_like(v) for v in slots.get(model, 1)])
    after = model(batch).detach()
    own = batch.scenario == 1
    assert not torch.allclose(before[own], after[own])
    assert torch.equal(before[~own], after[~own])

    with slots.only(model, 1) as params:
        F.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
        views = {id(v) for v in params}
        for name, p in model.named_parameters():
            if id(p) not in views:
                assert p.grad is None and not p.requires_grad, name
        for e in slots.entries:
            g = dict(model.named_parameters())[e.name(1)].grad
            if e.dim is not None:  # the other scenarios' slices of a shared tensor get a zero gradient
                other = torch.cat([g.narrow(e.dim, s * e.size, e.size) for s in (0, 2)])
                assert torch.count_nonzero(other) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_reptile_matches_a_hand_computation():
    """Two inner SGD steps on one task, one outer step: phi' = phi + eps * (theta2 - phi) with
    theta1 = phi - a * g(phi), theta2 = theta1 - a * g(theta1), computed here by autograd."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="shared_bottom", dropout=0.0, text={"mode": "off"})
    model = build_model(SPEC, cfg)
    slots = ScenarioSlots(SPEC, cfg)
    task = rows(16, 0, seed=3)
    ac = AdaptConfig(meta_steps=1, inner_steps=2, inner_lr=0.1, outer_lr=0.4, batch_size=16)
    phi = [torch.randn_like(v) * 0.1 for v in slots.get(model, 2)]

    def grad_at(values):
        slots.set(model, 2, values)
        views = [dict(model.named_parameters())[e.name(2)] for e in slots.entries]  # whole per-scenario modules
        b = Batch(task.cat, task.num, torch.full_like(task.scenario, 2), task.label, task.weight)
        loss = F.binary_cross_entropy_with_logits(model(b), b.label)
        return torch.autograd.grad(loss, views)

    t1 = [p - 0.1 * g for p, g in zip(phi, grad_at(phi))]
    t2 = [p - 0.1 * g for p, g in zip(t1, grad_at(t1))]
    want = [p + 0.4 * (q - p) for p, q in zip(phi, t2)]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    got = reptile(model, slots, 2, {0: task}, ac, phi)
    for w, g in zip(want, got):
        assert torch.allclose(w, g, atol=1e-6)
    assert all(torch.equal(g, v) for g, v in zip(got, slots.get(model, 2)))  # phi is left in the slot
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(k.startswith("towers.towers.2.") for k in changed)


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory, ray_cluster):
    """Synthetic data, 3 scenarios; the last one is kept out of training."""
    from mcl_ray.data.prepare import prepare
    from mcl_ray.train.trainer import materialized_splits, train_one

    tmp = tmp_path_factory.mktemp("adapt")
    cfg = load_config("experiments/synthetic_quick.yaml", [
        f"run_dir={tmp}", "data.num_interactions=20000", "train.epochs=3", "evaluate.ranking_users=50",
        "train.batch_size=1024", "model.hidden=[32]", "model.tower_hidden=[16]"])
    pdir = prepare(cfg).out_dir
    spec = FeatureSpec.load(pdir)
    held = spec.scenario_names[-1]
    cfg = load_config("experiments/synthetic_quick.yaml", [
        f"run_dir={tmp}", "data.num_interactions=20000", "train.epochs=3", "evaluate.ranking_users=50",
        "train.batch_size=1024", "model.hidden=[32]", "model.tower_hidden=[16]",
        f"train.holdout_scenarios=[{held}]", "train.num_workers=0"])  # Ray Train is not under test here
    splits = materialized_splits(spec, pdir, holdout=[spec.num_scenarios - 1])
    for name, ds in splits.items():
        seen = {int(s) for b in ds.iter_batches(batch_format="numpy") for s in b[spec.scenario_column]}
        assert seen == set(range(spec.num_scenarios - 1)), name  # no row of the held-out scenario, in either
    train_one(cfg, pdir, tmp / "train" / "seed_1", seed=1)
    return tmp, spec, held


def test_adapt_changes_only_the_new_scenario_and_serves_it(held_out_run):
    from mcl_ray.artifact import export_artifact
    from mcl_ray.cli import app
    from mcl_ray.data.splits import read_split
    from mcl_ray.models.weights import MODEL
    from safetensors.torch import load_file
    from mcl_ray.serve.recommender import Query, Recommender, RequestError

    run, spec, held = held_out_run
    r = CliRunner().invoke(app, ["adapt", str(run), "--scenario", held, "--method", "finetune", "--k", "400",
                                 "--set", "adapt.max_steps=60", "--set", "adapt.eval_every=10"])
    assert r.exit_code == 0, r.output
    out = run / "adapt" / f"{held}-finetune-k400"
    summary = json.loads((out / "adapt.json").read_text())
    assert summary["rows"] == {"fit": 320, "held_back": 80}
    assert 0 < summary["changed_elements"] <= summary["scenario_elements"]
    assert 0.0 < summary["test"]["auc"] < 1.0 and summary["init_test"] is not None
    assert json.loads((out / "metrics.json").read_text())["by_scenario"][held]["auc"] == pytest.approx(
        summary["test"]["auc"], abs=1e-6)

    base, adapted = load_file(str(run / "train" / "seed_1" / MODEL)), load_file(str(out / MODEL))
    cfg = ModelConfig.model_validate(json.loads((out / "config.json").read_text())["model"])
    slots = ScenarioSlots(spec, cfg)
    t = spec.scenario_names.index(held)
    # ids the trained scenarios' train rows use, read here independently of the adapt code
    train = read_split(run / "prepare", spec, "train").to_pandas()
    trained_rows = train[train[spec.scenario_column] != t]
    for name in base:  # outside the held-out scenario's slot and its own ids' rows nothing moved
        mask = torch.ones_like(base[name], dtype=torch.bool)
        for e in slots.entries:
            if e.name(t) == name:
                if e.dim is None:
                    mask.zero_()
                else:
                    mask.narrow(e.dim, t * e.size, e.size).fill_(False)
        if name.startswith("inputs.embeddings."):
            feature = spec.categorical[int(name.split(".")[2])].name
            own = torch.ones(len(mask), dtype=torch.bool)
            own[torch.as_tensor(trained_rows[feature].unique())] = False
            own[0] = False
            mask[own] = False
            moved = (base[name] != adapted[name]).any(1).nonzero().flatten().tolist()
            assert set(moved) <= set(own.nonzero().flatten().tolist()), name
        assert torch.equal(base[name][mask], adapted[name][mask]), name
    assert summary["new_id_rows"]["user_id"] > 0  # synthetic segments: users of the held-out one are its own

    # the adapted artifact serves the scenario with the new parameters; other scenarios score as before
    base_art = export_artifact(run / "train" / "seed_1", run / "prepare", run / "base_artifact", quiet=True)
    new, old = Recommender(out / "artifact"), Recommender(base_art)
    user, items = next(iter(new.users.row)), new.items.keys[:5]
    for s in spec.scenario_names:
        if s == held:
            continue
        a = [x["score"] for x in new.score(Query(user_id=user, scenario=s, item_ids=items))["scores"]]
        b = [x["score"] for x in old.score(Query(user_id=user, scenario=s, item_ids=items))["scores"]]
        assert a == b, s
    assert len(new.recommend_many([Query(user_id=user, scenario=held, k=5)])[0]["items"]) == 5
    assert held in new.info()["scenarios"] and new.info()["untrained_scenarios"] == []
    # the base artifact knows the held-out scenario but refuses it: its parameters are untrained
    assert old.info()["untrained_scenarios"] == [held] and held not in old.info()["scenarios"]
    with pytest.raises(RequestError) as e:
        old.score(Query(user_id=user, scenario=held, item_ids=items))
    assert e.value.status == 422 and "mcl-ray adapt" in str(e.value)

    again = CliRunner().invoke(app, ["adapt", str(run), "--scenario", held, "--method", "finetune", "--k", "400",
                                     "--set", "adapt.max_steps=60", "--set", "adapt.eval_every=10", "--no-export"])
    assert again.exit_code == 0 and "reusing" in again.output  # same inputs: the stage reuses its output


def test_meta_and_scratch(held_out_run):
    from mcl_ray.train.adapt import Adapter

    run, spec, held = held_out_run
    a = Adapter(run / "train" / "seed_1", run / "prepare", held)
    ac = AdaptConfig(method="meta", k=300, meta_steps=20, meta_rows=2000, max_steps=40, eval_every=10)
    model, s = a.adapt(ac)
    assert s["seconds"]["meta"] > 0 and 0 < s["changed_elements"] <= s["scenario_elements"]
    tower_only = a.adapt(ac.model_copy(update={"method": "finetune", "new_ids": False}))[1]
    assert tower_only["new_id_rows"] == {} and tower_only["changed_elements"] <= a.slots.numel(model)
    assert s["init_test"]["auc"] != a.adapt(ac.model_copy(update={"method": "finetune"}))[1]["init_test"]["auc"]
    model, s = a.adapt(ac.model_copy(update={"method": "scratch"}))
    assert s["init_test"] is None and 0.0 < s["test"]["auc"] < 1.0
    assert s["changed_elements"] > s["scenario_elements"]  # a fresh model: everything is new


def test_adapt_errors(held_out_run):
    from mcl_ray.cli import app

    run, spec, held = held_out_run
    r = CliRunner().invoke(app, ["adapt", str(run), "--scenario", "nope"])
    assert r.exit_code == 2 and "unknown scenario 'nope'" in r.output and "holdout_scenarios" in r.output
    r = CliRunner().invoke(app, ["adapt", str(run), "--scenario", held, "--set", "train.lr=0.1"])
    assert r.exit_code == 2 and "adapt.* keys only" in r.output
    r = CliRunner().invoke(app, ["adapt", str(run), "--scenario", held, "--method", "maml"])
    assert r.exit_code == 2 and "method" in r.output
