"""Two-stage serving's retrieval model: towers that only see their own side, in-batch softmax
training that learns who likes what."""

import numpy as np
import torch
import torch.nn.functional as F

from mcl_ray.core.config import ModelConfig, RetrievalConfig
from mcl_ray.models.backbones import build_model
from mcl_ray.models.batch import Batch
from mcl_ray.models.item_index import ItemIndex

from test_models import make_batch, make_spec

CFG = ModelConfig(backbone="two_tower", embedding_dim=8, hidden=[32], tower_hidden=[16], dropout=0.0)


def test_towers_see_only_their_own_side_and_eval_scores_the_rows_own_pair():
    torch.manual_seed(0)
    model = build_model(make_spec(), CFG).eval()
    b = make_batch(16)
    u, i = model.towers(b)
    assert u.shape == i.shape == (16, 16) and torch.allclose(u.norm(dim=1), torch.ones(16))
    assert torch.allclose(model(b), (u * i).sum(1) / CFG.temperature)
    other_items = Batch(cat=b.cat.clone(), num=torch.randn_like(b.num), scenario=b.scenario, label=b.label)
    other_items.cat[:, 1] = (b.cat[:, 1] + 1) % 40  # item_id and year are item-side
    assert torch.equal(model.user_vectors(other_items), u) and not torch.allclose(model.item_vectors(other_items), i)
    other_users = Batch(cat=b.cat.clone(), num=b.num, scenario=(b.scenario + 1) % 3, label=b.label)
    other_users.cat[:, 0] = (b.cat[:, 0] + 1) % 50
    assert torch.equal(model.item_vectors(other_users), i) and not torch.allclose(model.user_vectors(other_users), u)


def test_training_logits_are_the_positive_rows_with_repeated_items_masked():
    model = build_model(make_spec(), CFG).train()
    b = make_batch(16)
    b.cat[:, 1] = torch.arange(16) % 5  # items repeat
    logits = model(b)
    pos = (b.label > 0).nonzero().squeeze(1)
    assert logits.shape == (len(pos), len(pos))
    ids = b.cat[pos, 1]
    for r in range(len(pos)):
        for c in range(len(pos)):
            masked = bool(logits[r, c] < -1e8)
            assert masked == (r != c and bool(ids[r] == ids[c]))


def test_in_batch_softmax_learns_which_items_a_user_likes():
    """Users u like items u % 10 * 4 .. +3; after training, each user's top-4 of the 40 items are mostly theirs."""
    torch.manual_seed(0)
    model = build_model(make_spec(numeric=False), CFG)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(150):
        users = torch.randint(0, 50, (64,))
        items = (users % 10) * 4 + torch.randint(0, 4, (64,))
        b = Batch(cat=torch.stack([users, items, torch.zeros(64, dtype=torch.long)], 1), num=torch.zeros(64, 0),
                  scenario=torch.zeros(64, dtype=torch.long), label=torch.ones(64))
        logits = model.train()(b)
        loss = F.cross_entropy(logits, torch.arange(len(logits)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        all_items = Batch(cat=torch.stack([torch.zeros(40, dtype=torch.long), torch.arange(40),
                                           torch.zeros(40, dtype=torch.long)], 1), num=torch.zeros(40, 0),
                          scenario=torch.zeros(40, dtype=torch.long))
        iv = model.item_vectors(all_items)
        hits = 0
        for u in range(50):
            q = Batch(cat=torch.tensor([[u, 0, 0]]), num=torch.zeros(1, 0), scenario=torch.zeros(1, dtype=torch.long))
            top = (model.user_vectors(q) @ iv.T).topk(4).indices.squeeze(0)
            hits += int(((top // 4) == u % 10).sum())
    assert hits / 200 > 0.8  # chance: 0.1


def clustered(n: int, dim: int = 32, seed: int = 0):
    """Unit vectors around 200 centres (item embeddings cluster; pure noise would be no test of ANN)."""
    g = np.random.default_rng(seed)
    centres = g.standard_normal((200, dim))
    x = centres[g.integers(0, 200, n)] + 0.35 * g.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_index_equals_brute_force_and_survives_a_file(tmp_path):
    items, queries = clustered(3000), clustered(20, seed=1)
    index = ItemIndex.build(items, exact_below=10_000)
    assert index.kind == "exact"
    index.save(tmp_path / "i.faiss")
    loaded = ItemIndex.load(tmp_path / "i.faiss", threads=1)
    scores, pos = loaded.search(queries, 50)
    brute = queries @ items.T
    want = np.argsort(-brute, axis=1)[:, :50]
    assert np.allclose(scores, np.take_along_axis(brute, want, 1), atol=1e-5)
    assert all(set(p) == set(w) for p, w in zip(pos, want))
    assert loaded.search(queries, 5000)[1].shape == (20, 3000)  # a catalogue smaller than N: every item


def test_hnsw_recall_against_exact_on_100k_items():
    items, queries = clustered(100_000), clustered(200, seed=1)
    cfg = RetrievalConfig()  # the shipped HNSW settings
    ann = ItemIndex.build(items, exact_below=50_000, hnsw_m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction,
                          ef_search=cfg.hnsw_ef_search)
    assert ann.kind == "hnsw"
    exact = ItemIndex.build(items, exact_below=10**9)
    got, want = ann.search(queries, 100)[1], exact.search(queries, 100)[1]
    recall = np.mean([len(set(g) & set(w)) / 100 for g, w in zip(got, want)])
    assert recall >= 0.95, recall
