"""LLM semantic features in the model (frozen embeddings, finetuned encoder) and the llm_ranker
cross-encoder, on real ML-1M texts and the packaged MiniLM."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mcl_ray.core.config import ConfigError, load_config
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.models.encoder import EncoderError
from mcl_ray.models.backbones import build_model
from mcl_ray.data.texts import PreparedTexts, load_embeddings
from mcl_ray.data.vocab import Vocabularies
from mcl_ray.models.text import attach_texts, check_text_inputs
from mcl_ray.models import weights as ck
from mcl_ray.models.batch import Batch, load_split

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "experiments/ml1m_swr_quick.yaml"


def cfg_for(run_dir, *overrides):
    return load_config(QUICK, [f"run_dir={run_dir}", "data.max_interactions=3000", "model.hidden=[32]",
                               "model.tower_hidden=[8]", "evaluate.ranking_users=0", *overrides])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    from mcl_ray.data.prepare import prepare
    from mcl_ray.llm.encode import encode_stage

    run_dir = tmp_path_factory.mktemp("text")
    cfg = cfg_for(run_dir)
    pdir = prepare(cfg).out_dir
    encode_stage(cfg, pdir)
    return run_dir, pdir, FeatureSpec.load(pdir)


def sgd_steps(model, batch, steps=3, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_frozen_text_table_holds_the_embeddings_and_only_the_projection_trains(prepared):
    run_dir, pdir, spec = prepared
    assert {f.name: f.dim for f in spec.features if f.kind == "text_embedding"} == {"item_text": 384, "user_text": 384}
    torch.manual_seed(0)
    model = build_model(spec, cfg_for(run_dir).model)  # the quick experiment: text frozen, item + user
    attach_texts(model, PreparedTexts(pdir, spec))
    text = model.inputs.text
    keys, emb = load_embeddings(pdir, spec, "item")
    vk = Vocabularies.load(pdir, spec).keys("item_id")
    assert sorted(keys) == sorted(vk[1:])  # encode.scope=vocab: exactly the items a model has an id for
    for vid in (1, 2, len(vk) - 1):  # the table row of an item id is that item's embedding
        assert np.allclose(text.tables["item"].weight[vid].numpy(), emb[keys.index(vk[vid])])
    assert text.tables["item"].weight[0].abs().sum() == 0  # OOV id: no text
    assert model.inputs.num_fields == len(spec.categorical) + 2

    batch = load_split(pdir, spec, "train").take(torch.arange(256))
    table0 = text.tables["item"].weight.clone()
    proj0 = text.proj["item"].weight.clone()
    sgd_steps(model, batch)
    assert torch.equal(text.tables["item"].weight, table0)  # frozen: the embeddings never move
    assert not torch.allclose(text.proj["item"].weight, proj0)  # the projection trains
    # the text field matters: other embeddings change the prediction
    before = model.eval()(batch)
    text.tables["item"].weight.data.copy_(torch.roll(table0, 1, 0))
    assert not torch.allclose(model(batch), before)


@pytest.mark.parametrize("method", ["lora", "top_layers"])
def test_finetune_changes_encoder_weights(prepared, method):
    run_dir, pdir, spec = prepared
    cfg = cfg_for(run_dir, "model.text.mode=finetune", f"model.text.finetune={method}", "model.text.fields=[item]",
                  "model.text.max_length=16")
    torch.manual_seed(0)
    model = build_model(spec, cfg.model)
    attach_texts(model, PreparedTexts(pdir, spec))
    enc = model.inputs.text.encoder
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    batch = load_split(pdir, spec, "train").take(torch.arange(48))
    sgd_steps(model, batch, steps=2, lr=1e-3)
    after = enc.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "finetune did not change the encoder"
    if method == "lora":
        assert trainable and all("lora_" in n for n in trainable)
        assert changed and all("lora_" in k for k in changed)  # the base weights stay as pretrained
        delta = enc.get_base_model().encoder.layer[0].attention.self.query.lora_B["default"].weight
        assert delta.abs().sum() > 0  # LoRA's B starts at zero: it moved
    else:
        last = len(enc.encoder.layer) - 1
        assert all(f"encoder.layer.{last}." in k for k in changed)
        assert not any(k.startswith("encoder.layer.0.") for k in changed)


def test_finetune_under_ray_train_ddp_and_llm_ranker_above_chance(prepared):
    """Both through the real Ray Train path: finetune (LoRA) on 2 DDP workers, then llm_ranker."""
    from mcl_ray.train.trainer import train_one

    run_dir, pdir, spec = prepared
    small = 'train.sample_rows={"train": 256, "valid": 128, "test": 128}'
    cfg = cfg_for(run_dir, "model.text.mode=finetune", "model.text.fields=[item]", "model.text.max_length=16",
                  small, "train.epochs=1", "train.batch_size=64", "train.num_workers=2", "train.cpus_per_worker=0.5")
    res = train_one(cfg, pdir, run_dir / "ft", seed=3)
    w = load_file(run_dir / "ft" / ck.MODEL)
    lora_b = [v for k, v in w.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # adapters trained across 2 workers
    assert res.history[0]["world_size"] == 2 and np.isfinite(res.metrics["overall"]["auc"])

    # llm_ranker: the MiniLM cross-encoder learns the click label above chance on a small sample
    # (1,000 rows: test AUC 0.61 here, 1,500 gave 0.62 in 40% more time; 16 tokens fell to 0.56)
    cfg = cfg_for(run_dir, "model.backbone=llm_ranker", "model.text.mode=off", "model.text.max_length=24",
                  'train.sample_rows={"train": 1000, "valid": 300, "test": 600}', "train.epochs=1",
                  "train.batch_size=16", "train.optimizer=adamw", "train.lr=5e-5", "train.weight_decay=0.01",
                  "train.eval_batch_size=128")
    res = train_one(cfg, pdir, run_dir / "ranker", seed=1)
    assert res.metrics["overall"]["auc"] > 0.55, res.metrics["overall"]
    assert res.metrics["backbone"] == "llm_ranker"


def test_llm_ranker_packs_user_then_item(prepared):
    run_dir, pdir, spec = prepared
    cfg = cfg_for(run_dir, "model.backbone=llm_ranker", "model.text.mode=off", "model.text.max_length=16")
    model = build_model(spec, cfg.model)
    attach_texts(model, PreparedTexts(pdir, spec))
    cat = load_split(pdir, spec, "valid").take(torch.arange(4)).cat
    p = model.pairs(cat)
    tok = model.tokenizer
    for r in range(4):
        n = int(p["attention_mask"][r].sum())
        ids = p["input_ids"][r, :n].tolist()
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and ids.count(tok.sep_token_id) == 2
        sep = ids.index(tok.sep_token_id)
        u = int(cat[r, model.user_key])
        assert ids[1:sep] == model.user_ids[u, :int(model.user_len[u])].tolist()  # user text first
        assert p["token_type_ids"][r, :sep + 1].sum() == 0 and p["token_type_ids"][r, sep + 1:n].all()
        assert not p["attention_mask"][r, n:].any()
    # one row alone scores the same as in the batch (padding does not leak)
    model.eval()
    with torch.no_grad():
        zeros = torch.zeros(4, dtype=torch.long)
        full = model(Batch(cat=cat, num=torch.zeros(4, 0), scenario=zeros))
        alone = torch.cat([model(Batch(cat=cat[i:i + 1], num=torch.zeros(1, 0), scenario=zeros[:1])) for i in range(4)])
    torch.testing.assert_close(full, alone, rtol=1e-4, atol=1e-4)


def test_missing_texts_or_embeddings_are_clear_errors(prepared, tmp_path):
    run_dir, pdir, spec = prepared
    bare = spec.model_copy(deep=True)
    bare.features = [f for f in bare.features if f.kind != "text_embedding"]
    with pytest.raises(EncoderError, match="run `mcl-ray encode CONFIG` first"):
        check_text_inputs(cfg_for(run_dir).model, bare)
    bare.text = {}
    with pytest.raises(EncoderError, match="prepare.text was null"):
        check_text_inputs(cfg_for(run_dir, "model.backbone=llm_ranker", "model.text.mode=off").model, bare)
    with pytest.raises(ConfigError, match="reads the texts itself"):
        cfg_for(run_dir, "model.backbone=llm_ranker")
    with pytest.raises(ConfigError, match="needs item_id in prepare.categorical"):
        cfg_for(run_dir, 'prepare.categorical=[{"name": "user_id"}, {"name": "gender"}]')
    with pytest.raises(ConfigError, match="prepare.text must not be null"):
        cfg_for(run_dir, "prepare.text=null")
    with pytest.raises(EncoderError, match="not found"):
        build_model(spec, cfg_for(run_dir, "model.text.mode=finetune", f"model.text.encoder={tmp_path / 'x'}").model)


def test_cli_train_without_embeddings_exits_2(tmp_path, ray_cluster):
    from typer.testing import CliRunner

    from mcl_ray.cli import app

    r = CliRunner().invoke(app, ["prepare", str(QUICK), "--set", f"run_dir={tmp_path}", "--set",
                                 "data.max_interactions=2000"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train", str(QUICK), "--set", f"run_dir={tmp_path}", "--set",
                                 "data.max_interactions=2000"])
    assert r.exit_code == 2 and "run `mcl-ray encode CONFIG` first" in r.output
    r = CliRunner().invoke(app, ["tune", str(QUICK), "--set", f"run_dir={tmp_path}", "--set",
                                 "data.max_interactions=2000"])  # the same missing input: the same exit code
    assert r.exit_code == 2 and "run `mcl-ray encode CONFIG` first" in r.output
    assert json.loads((tmp_path / "prepare" / "feature_spec.json").read_text())["text"]["item"]["embedding"] is None
