"""LLM user profiles: prompts built from train rows only, the real SmolLM2 writing profiles through
the transformers backend, the profile as an encoded text feature keyed by user_id, and the cache."""

from pathlib import Path

import pytest

from mcl_ray.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "experiments/ml1m_swr_quick.yaml"


def cfg_of(run, *extra):
    return load_config(QUICK, [f"run_dir={run}", "data.max_interactions=20000", "model.text.mode=frozen",
                               "model.text.fields=[item, profile]", "profile.backend=transformers",
                               "profile.users=3", "profile.max_new_tokens=12", "profile.batch_size=3", *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    from mcl_ray.data.prepare import prepare

    run = tmp_path_factory.mktemp("profile")
    return run, prepare(cfg_of(run)).out_dir


def test_profile_prompts_hold_only_train_facts(prepared):
    """Every title in a user's prompt is one of their train items (liked ones under "liked",
    disliked under "disliked"); no item they only have in valid or test is named."""
    import json

    import pyarrow.parquet as pq

    from mcl_ray.core.feature_spec import FeatureSpec
    from mcl_ray.data.splits import read_split
    from mcl_ray.llm.profile import build_profile_requests

    run, pdir = prepared
    spec = FeatureSpec.load(pdir)
    req = build_profile_requests(cfg_of(run, "profile.users=40"), spec, pdir)
    assert len(req) == 40 and req["user_key"].is_unique
    items = pq.read_table(pdir / spec.items_table).to_pandas()
    title = dict(zip(items["item_id"].astype(str), items["title"].astype(str)))
    rows = {s: read_split(pdir, spec, s, extra=["user_key", "item_key"]).to_pandas() for s in spec.splits}
    named = 0
    for r in req.itertuples():
        text = json.loads(r.messages_json)[1]["content"]
        liked_part, disliked_part = text.split("Movies the user disliked:")
        tr = rows["train"][rows["train"]["user_key"] == r.user_key]
        liked = {title[k] for k in tr[tr["label"] > 0]["item_key"]}
        disliked = {title[k] for k in tr[tr["label"] <= 0]["item_key"]}
        shown_liked = [ln[2:].rsplit(" (", 1)[0] for ln in liked_part.splitlines() if ln.startswith("- ")]
        shown_disliked = [ln[2:].rsplit(" (", 1)[0] for ln in disliked_part.splitlines() if ln.startswith("- ")]
        assert set(shown_liked) - {"(none)"} <= liked and set(shown_disliked) - {"(none)"} <= disliked
        held = set()
        for s in ("valid", "test"):
            other = rows[s][rows[s]["user_key"] == r.user_key]["item_key"]
            held |= {title[k] for k in other} - liked - disliked
        assert not (set(shown_liked) | set(shown_disliked)) & held, r.user_key  # whole lines (Alien in Aliens)
        named += len(shown_liked) + len(shown_disliked)
    assert named > 40


@pytest.mark.ray
def test_smollm2_writes_profiles_that_become_a_text_feature(prepared):
    import pyarrow.parquet as pq

    from mcl_ray.core.feature_spec import FeatureSpec
    from mcl_ray.data.texts import PreparedTexts
    from mcl_ray.llm.encode import encode_stage
    from mcl_ray.llm.profile import profile_stage

    run, pdir = prepared
    cfg = cfg_of(run)
    res = profile_stage(cfg, pdir, quiet=True)
    assert not res.cached and res.stats["users"] == 3
    t = pq.read_table(res.table).to_pandas()
    assert len(t) == 3 and t["text"].str.len().gt(0).all() and t["generated_tokens"].between(1, 12).all()
    spec = FeatureSpec.load(pdir)
    tf = spec.text["profile"]
    assert tf.key == "user_id" and tf.generator["model"] == cfg.profile.model and tf.generator["prompt_version"]
    assert profile_stage(cfg, pdir, quiet=True).cached  # same inputs: nothing is generated again

    encode_stage(cfg, pdir, quiet=True)
    spec = FeatureSpec.load(pdir)
    feat = next(f for f in spec.features if f.name == "profile_text")
    assert feat.kind == "text_embedding" and feat.source == "user"
    texts = PreparedTexts(pdir, spec)
    by_id = texts.texts("profile")
    assert sum(1 for x in by_id if x) == 3  # the 3 profiled users, looked up by their user_id
    emb = texts.embeddings("profile")
    assert (abs(emb).sum(1) > 0).sum() == 3


@pytest.mark.parametrize("n, batch", [(6040, 64), (64, 64), (65, 64), (3, 16), (0, 16)])
def test_generator_requests_go_out_one_batch_per_block(n, batch):
    """The vLLM stage passes a block's answers on when the whole block is done: blocks of at most one
    batch keep answers (and the progress bar) flowing; 6,040 profiles in 4 blocks hit Ray Data's
    no-progress timeout after 30 minutes."""
    from mcl_ray.llm.generator import request_blocks

    blocks = request_blocks(n, batch)
    # as many blocks as batches: each of dataset_in_blocks' equal cuts holds at most one batch
    assert blocks >= 1 and n <= blocks * batch and (n == 0 or (blocks - 1) * batch < n)
