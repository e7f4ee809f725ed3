"""Large id tables train with sparse gradients and a lazy Adam: a step moves only the rows of the
batch, every other parameter stays with dense Adam, and checkpoints round-trip both optimizers
(and still read the one-optimizer format)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mcl_ray.core.config import TrainConfig
from mcl_ray.models.backbones import build_model
from mcl_ray.train import checkpoint as ck
from mcl_ray.train.optim import make_optimizer, make_sparse

from test_models import CFG, make_batch, make_spec


def setup(min_rows: int, schedule: str = "constant"):
    torch.manual_seed(0)
    model = build_model(make_spec(), CFG)
    tables = make_sparse(model, min_rows)
    opt, sched = make_optimizer(TrainConfig(lr=0.01, lr_schedule=schedule, epochs=3), model)
    return model, tables, opt, sched


def step(model, opt, batch, seed: int = 0) -> None:
    torch.manual_seed(seed)  # the same dropout masks for two models given the same step
    opt.zero_grad(set_to_none=True)
    F.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
    opt.step()


def test_only_large_trainable_tables_become_sparse():
    model, tables, opt, _ = setup(min_rows=40)  # user_id 50 rows, item_id 40, gender 3
    assert sorted(t.num_embeddings for t in tables) == [40, 50]
    assert set(opt.parts) == {"dense", "sparse"}
    assert isinstance(opt.parts["sparse"], torch.optim.SparseAdam)
    sparse_ids = {id(t.weight) for t in tables}
    assert {id(p) for g in opt.parts["sparse"].param_groups for p in g["params"]} == sparse_ids
    dense = {id(p) for g in opt.parts["dense"].param_groups for p in g["params"]}
    assert not dense & sparse_ids and len(dense) + len(sparse_ids) == sum(1 for p in model.parameters())
    _, none, opt0, _ = setup(min_rows=0)
    assert none == [] and set(opt0.parts) == {"dense"}


def test_a_step_moves_only_the_rows_in_the_batch():
    model, tables, opt, _ = setup(min_rows=40)
    users = tables[[t.num_embeddings for t in tables].index(50)]
    batch = make_batch(16)
    seen = set(batch.cat[:, 0].tolist())
    before = users.weight.detach().clone()
    step(model, opt, batch)
    assert users.weight.grad.is_sparse
    moved = {i for i in range(50) if not torch.equal(before[i], users.weight[i])}
    assert moved and moved <= seen  # rows outside the batch: untouched (dense Adam + L2 would move them all)


def test_checkpoint_round_trips_both_optimizers_and_schedulers(tmp_path):
    a, _, opt_a, sched_a = setup(min_rows=40, schedule="cosine")
    for s in range(3):
        step(a, opt_a, make_batch(16, seed=s))
        sched_a.step()
    ck.save_checkpoint(tmp_path / "c", a, opt_a, sched_a, {"epoch": 3})
    b, _, opt_b, sched_b = setup(min_rows=40, schedule="cosine")
    assert ck.load_checkpoint(tmp_path / "c", b, opt_b, sched_b) == {"epoch": 3}
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] < 0.01  # the schedule went on
    for s in (5, 6):  # the same next steps give the same weights: moments and step counts were restored
        step(a, opt_a, make_batch(16, seed=s), seed=s)
        step(b, opt_b, make_batch(16, seed=s), seed=s)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    dense_only = setup(min_rows=0)
    with pytest.raises(ValueError, match="sparse_embedding_rows"):
        ck.load_checkpoint(tmp_path / "c", *dense_only[:1], dense_only[2], dense_only[3])


def test_reads_a_checkpoint_written_with_one_dense_optimizer(tmp_path):
    a, _, opt_a, _ = setup(min_rows=0)
    step(a, opt_a, make_batch(16))
    (tmp_path / "c").mkdir()
    ck.save_checkpoint(tmp_path / "c", a, opt_a, None, {"epoch": 1})
    # rewrite it in the older layout: "<param>.<key>" tensors and one param_groups/scalars block
    tensors = {k.split("/", 1)[1]: v for k, v in load_file(str(tmp_path / "c" / ck.OPTIM)).items()}
    save_file(tensors, str(tmp_path / "c" / ck.OPTIM))
    blob = json.loads((tmp_path / "c" / ck.STATE).read_text())
    blob["optimizer"] = {**blob["optimizer"]["parts"]["dense"], "scheduler": None}
    (tmp_path / "c" / ck.STATE).write_text(json.dumps(blob))
    b, _, opt_b, _ = setup(min_rows=0)
    ck.load_checkpoint(tmp_path / "c", b, opt_b, None)
    step(a, opt_a, make_batch(16, seed=1))
    step(b, opt_b, make_batch(16, seed=1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_extra_training_only_parameters_get_no_decay_and_round_trip(tmp_path):
    """The ordinal offsets (train.ordinal_cuts) live outside the model: make_optimizer puts them in a
    group of their own without weight decay, and a checkpoint restores their Adam state too."""
    from mcl_ray.train.ordinal import OrdinalCuts

    def build():
        torch.manual_seed(0)
        model, cuts = build_model(make_spec(), CFG), OrdinalCuts([1.0, 4.0], (1.0, 5.0), threshold=3.0)
        return (model, cuts, *make_optimizer(TrainConfig(lr=0.01, weight_decay=0.1), model, [cuts.offset]))

    model, cuts, opt, _ = build()
    groups = opt.parts["dense"].param_groups
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert groups[1]["params"] == [cuts.offset]
    batch = make_batch(16)
    batch.soft = torch.rand(16)
    logits = model(batch)
    (F.binary_cross_entropy_with_logits(logits, batch.label) + cuts(logits, batch.soft).mean()).backward()
    start = cuts.offset.detach().clone()
    opt.step()
    assert not torch.equal(cuts.offset.detach(), start)
    ck.save_checkpoint(tmp_path / "c", model, opt, None, {"epoch": 1})
    model2, cuts2, opt2, _ = build()
    ck.load_checkpoint(tmp_path / "c", model2, opt2, None)
    saved = opt.parts["dense"].state[cuts.offset]
    loaded = opt2.parts["dense"].state[cuts2.offset]
    assert torch.equal(saved["exp_avg"], loaded["exp_avg"]) and torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])
