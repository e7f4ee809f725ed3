"""Shape and numeric tests of the model blocks and every backbone."""

import pytest
import torch

from mcl_ray.models.batch import Batch

from mcl_ray.core.config import ModelConfig, TextFeatureConfig
from mcl_ray.core.feature_spec import Feature, FeatureSpec
from mcl_ray.models import blocks
from mcl_ray.models.backbones import BACKBONES, build_model
from mcl_ray.models.text import TextFields

S = 3
# llm_ranker reads real texts with a real tokenizer: tests/test_text_features.py; two_tower is no ranker
ID_BACKBONES = sorted(set(BACKBONES) - {"llm_ranker", "two_tower"})  # two_tower: tests/test_retrieval.py


def make_spec(text_dim: int | None = None, numeric: bool = True) -> FeatureSpec:
    feats = [Feature(name="user_id", kind="categorical", source="user", vocab_size=50),
             Feature(name="item_id", kind="categorical", source="item", vocab_size=40),
             Feature(name="gender", kind="categorical", source="user", vocab_size=3)]
    if numeric:
        feats.append(Feature(name="year", kind="numeric", source="item", mean=0.0, std=1.0))
    if text_dim:
        feats.append(Feature(name="item_text", kind="text_embedding", source="item", dim=text_dim))
    return FeatureSpec(features=feats, scenario_names=["a", "b", "c"], splits={"train": "x"}, num_rows={"train": 1},
                       data_fingerprint="t")


def make_batch(n: int = 32, scenario: int | None = None, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(cat=torch.stack([torch.randint(0, v, (n,), generator=g) for v in (50, 40, 3)], 1),
                 num=torch.randn(n, 1, generator=g),
                 scenario=torch.full((n,), scenario) if scenario is not None else torch.randint(0, S, (n,), generator=g),
                 label=torch.randint(0, 2, (n,), generator=g).float(), weight=torch.ones(n))


CFG = ModelConfig(embedding_dim=8, hidden=[32, 16], tower_hidden=[8], dropout=0.1, num_experts=3,
                  scenario_embedding_dim=4, attention_heads=2)


@pytest.mark.parametrize("name", ID_BACKBONES)
def test_backbone_shape_and_finite(name):
    torch.manual_seed(0)
    model = build_model(make_spec(), CFG.model_copy(update={"backbone": name}))
    out = model(make_batch())
    assert out.shape == (32,) and torch.isfinite(out).all()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out, make_batch().label)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", ID_BACKBONES)
def test_prediction_does_not_depend_on_batch_neighbours(name):
    torch.manual_seed(0)
    model = build_model(make_spec(), CFG.model_copy(update={"backbone": name})).eval()
    batch = make_batch(64)
    full = model(batch)
    alone = torch.cat([model(batch.slice(i, i + 1)) for i in range(8)])
    torch.testing.assert_close(full[:8], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,own", [
    ("shared_bottom", lambda m, s: m.towers.towers[s]),
    ("mmoe", lambda m, s: m.towers.towers[s]),
    ("ple", lambda m, s: m.specific[s]),
    ("single", lambda m, s: m.mlps[s]),
])
def test_scenario_only_touches_its_own_specific_parameters(name, own):
    torch.manual_seed(0)
    model = build_model(make_spec(), CFG.model_copy(update={"backbone": name, "dropout": 0.0}))
    out = model(make_batch(16, scenario=1))
    out.sum().backward()
    for s in range(S):
        grads = [p.grad for p in own(model, s).parameters()]
        touched = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert touched == (s == 1), (name, s)


def test_star_weight_is_elementwise_product_and_only_own_partition_gets_gradient():
    torch.manual_seed(0)
    layer = blocks.StarLinear(5, 4, S)
    with torch.no_grad():
        layer.w_spec.copy_(torch.rand_like(layer.w_spec))
        layer.b_spec.copy_(torch.randn_like(layer.b_spec))
    x = torch.randn(6, 5)
    scen = torch.tensor([0, 1, 2, 0, 1, 2])
    out = layer(x, scen)
    for i in range(6):
        s = int(scen[i])
        w = layer.w_shared * layer.w_spec[s]
        torch.testing.assert_close(layer.weight(s), w)
        torch.testing.assert_close(out[i], x[i] @ w + layer.b_shared + layer.b_spec[s])
    layer.zero_grad()
    layer(x[:2], torch.tensor([2, 2])).sum().backward()
    assert layer.w_spec.grad[2].abs().sum() > 0
    assert layer.w_spec.grad[:2].abs().sum() == 0 and layer.b_spec.grad[:2].abs().sum() == 0


def test_gate_rows_sum_to_one_and_gatenu_range():
    gate = blocks.Gate(10, num_experts=4, num_scenarios=S)
    w = gate(torch.randn(7, 10))
    assert w.shape == (7, S, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(7, S))
    assert (w >= 0).all()
    g = blocks.GateNU(10, 6)(torch.randn(7, 10) * 10)
    assert g.shape == (7, 6) and (g > 0).all() and (g < 2).all()


def test_partitioned_norm_is_per_sample_and_per_scenario():
    pn = blocks.PartitionedNorm(6, S)
    with torch.no_grad():
        pn.gamma_s[1] *= 3.0
    x = torch.randn(4, 6)
    out = pn(x, torch.tensor([0, 1, 0, 1]))
    ref = torch.nn.functional.layer_norm(x, (6,))
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1] * 3.0)


def test_mlp_experts_meta_shapes():
    assert blocks.MLP(10, [8, 4])(torch.randn(3, 10)).shape == (3, 4)
    assert blocks.MLP(10, []).out_dim == 10
    assert blocks.Experts(10, [8], 5, 0.0)(torch.randn(3, 10)).shape == (3, 5, 8)
    meta = blocks.MetaLinear(6, 5, 4)
    x, z, scen = torch.randn(3, 6), torch.randn(S, 4), torch.tensor([2, 0, 2])
    out = meta(x, z, scen)
    assert out.shape == (3, 5)
    for i in range(3):
        w = meta.w_gen(z[scen[i]]).view(6, 5)  # weights generated from the row's scenario
        torch.testing.assert_close(out[i], x[i] @ w + meta.b_gen(z[scen[i]]))


@pytest.mark.parametrize("name", ID_BACKBONES)
def test_every_backbone_takes_text_embeddings_through_a_projection(name):
    spec = make_spec(text_dim=12)
    cfg = CFG.model_copy(update={"backbone": name, "text": TextFeatureConfig(mode="frozen", fields=["item"])})
    torch.manual_seed(0)
    model = build_model(spec, cfg)
    text = [m for m in model.modules() if isinstance(m, TextFields)]
    assert text and all(t.tables["item"].weight.shape == (40, 12) for t in text)
    for t in text:
        t.tables["item"].weight.data.normal_()  # what load_text fills in from the encode stage
    batch = make_batch(64)
    model(batch).sum().backward()
    assert any(t.proj["item"].weight.grad.abs().sum() > 0 for t in text)
    assert all(t.tables["item"].weight.grad is None for t in text)  # frozen


def test_m2m_rejects_heads_not_dividing_dim():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(backbone="m2m", embedding_dim=10, attention_heads=3)


@pytest.mark.parametrize("numeric", [True, False])
@pytest.mark.parametrize("name", ID_BACKBONES)
def test_every_parameter_is_in_the_graph_even_when_a_scenario_is_absent(name, numeric):
    """DDP without find_unused_parameters needs a gradient (zero is fine) for every parameter."""
    model = build_model(make_spec(numeric=numeric), CFG.model_copy(update={"backbone": name}))
    batch = make_batch(8, scenario=0)
    if not numeric:
        batch.num = batch.num[:, :0]
    model(batch).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def _randomize_cross(model: torch.nn.Module, seed: int = 1) -> None:
    """Cross layers start as the identity (zero W, b): give them weights so a test exercises them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cross" in name.split("."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("name", ID_BACKBONES)
def test_cross_layers_in_every_backbone_score_rows_alone_as_in_a_batch_and_get_gradients(name):
    torch.manual_seed(0)
    model = build_model(make_spec(), CFG.model_copy(update={"backbone": name, "cross_layers": 2})).eval()
    _randomize_cross(model)
    batch = make_batch(64)
    full = model(batch)
    alone = torch.cat([model(batch.slice(i, i + 1)) for i in range(8)])
    torch.testing.assert_close(full[:8], alone, rtol=1e-5, atol=1e-6)
    model.train()
    model(batch).sum().backward()
    cross = [p for n, p in model.named_parameters() if ".cross." in n]
    assert len(cross) == (4 * S if name == "single" else 4)  # 2 layers x (W, b), per scenario for single
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cross)


def test_untrained_cross_layers_are_the_identity():
    """W = b = 0 at the start: the model scores as the same model without cross layers."""
    torch.manual_seed(0)
    plain = build_model(make_spec(), CFG.model_copy(update={"backbone": "shared_bottom"})).eval()
    crossed = build_model(make_spec(), CFG.model_copy(update={"backbone": "shared_bottom", "cross_layers": 3})).eval()
    missing, unexpected = crossed.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".cross." in k for k in missing)
    batch = make_batch(16)
    torch.testing.assert_close(crossed(batch), plain(batch))


def test_cross_layer_computes_x0_times_linear_plus_residual():
    torch.manual_seed(0)
    net = blocks.CrossNet(6, 2)
    _randomize_cross(torch.nn.ModuleDict({"cross": net}))
    x0 = torch.randn(5, 6)
    (l1, l2) = net.layers
    x1 = x0 * (x0 @ l1.weight.T + l1.bias) + x0
    x2 = x0 * (x1 @ l2.weight.T + l2.bias) + x1
    torch.testing.assert_close(net(x0), x2)
    # layer 1 holds the pair products: W[0, 3] = 1 adds x0[0] * x0[3] (e.g. a user x item term) to entry 0
    one = blocks.CrossNet(6, 1)
    with torch.no_grad():
        one.layers[0].weight[0, 3] = 1.0
    expected = x0.clone()
    expected[:, 0] += x0[:, 0] * x0[:, 3]
    torch.testing.assert_close(one(x0), expected)


def test_cross_layers_config_is_bounded():
    with pytest.raises(ValueError, match="cross_layers"):
        ModelConfig(cross_layers=-1)
    with pytest.raises(ValueError, match="cross_layers"):
        ModelConfig(cross_layers=9)
    with pytest.raises(ValueError, match="cross_layers"):  # a cross-encoder over texts has no fields to cross
        ModelConfig(backbone="llm_ranker", text=TextFeatureConfig(mode="off"), cross_layers=1)
