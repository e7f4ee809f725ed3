"""The encode stage: Ray Data actor-pool embeddings equal a plain transformers loop's, caching by
(encoder, text hash) with partial re-encoding, and clear errors for unusable encoders."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mcl_ray.core.config import load_config
from mcl_ray.models.encoder import EncoderError, check_encoder, resolve_encoder

ROOT = Path(__file__).resolve().parents[1]


def test_missing_or_non_encoder_models_are_refused(tmp_path):
    with pytest.raises(EncoderError, match="not found: give a local model folder"):
        resolve_encoder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="no config.json"):
        check_encoder(tmp_path / "empty")
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 576}))
    (llm / "tokenizer.json").write_text("{}")
    with pytest.raises(EncoderError, match="generative \\(decoder\\) model, not a text encoder"):
        check_encoder(llm)
    assert check_encoder(resolve_encoder("all-MiniLM-L6-v2"))["hidden_size"] == 384


def test_cli_encode_with_a_bad_encoder_exits_2(tmp_path):
    from mcl_ray.cli import app

    (tmp_path / "run/prepare").mkdir(parents=True)
    (tmp_path / "run/prepare/feature_spec.json").write_text("{}")
    r = CliRunner().invoke(app, ["encode", str(ROOT / "experiments/ml1m_swr_quick.yaml"), "--set",
                                 f"run_dir={tmp_path / 'run'}", "--set", f"encode.model={tmp_path}"])
    assert r.exit_code == 2 and "no config.json" in r.output


@pytest.mark.ray
def test_encoder_actors_default_to_the_cluster_cpus(ray_cluster):
    from mcl_ray.core.config import EncodeConfig
    from mcl_ray.llm.encode import MAX_AUTO_ACTORS, TEXTS_PER_AUTO_ACTOR, encoder_actors

    many = 100 * TEXTS_PER_AUTO_ACTOR
    cpus = int(ray_cluster.cluster_resources()["CPU"])  # 4 in the test cluster
    assert encoder_actors(EncodeConfig(), many) == min(cpus, MAX_AUTO_ACTORS) == 4
    assert encoder_actors(EncodeConfig(torch_threads=2), many) == 2  # each actor reserves its threads' CPUs
    assert encoder_actors(EncodeConfig(), 3 * TEXTS_PER_AUTO_ACTOR) == 3  # few texts: fewer actors to start
    assert encoder_actors(EncodeConfig(), 10) == 1
    assert encoder_actors(EncodeConfig(concurrency=3), 10) == 3  # set: as given
    assert encoder_actors(EncodeConfig(use_gpu=True), many) == 1  # one per GPU, and at least one


@pytest.mark.ray
def test_ray_embeddings_match_plain_loop_and_cache(tmp_path, ray_cluster):
    from mcl_ray.data.prepare import prepare
    from mcl_ray.core.feature_spec import FeatureSpec
    from mcl_ray.data.texts import load_embeddings
    from mcl_ray.llm.encode import encode_stage
    from mcl_ray.models.encoder import TextEncoder

    cfg = load_config(ROOT / "experiments/ml1m_swr_quick.yaml",
                      [f"run_dir={tmp_path}", "data.max_interactions=2000", "encode.batch_size=32",
                       "encode.concurrency=2", "encode.scope=all",
                       "model.text.fields=[item]"])  # items only: 6,040 user texts would add a minute, no new check
    pdir = prepare(cfg).out_dir
    first = encode_stage(cfg, pdir)
    spec = FeatureSpec.load(pdir)
    assert spec.text["item"].embedding == "embeddings/item.parquet"
    assert first.fields["item"]["encoded"] == first.fields["item"]["rows"] > 0

    items = pq.read_table(pdir / "items.parquet")
    keys, emb = load_embeddings(pdir, spec, "item")
    assert emb.shape == (items.num_rows, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    ref = TextEncoder(str(resolve_encoder("all-MiniLM-L6-v2")))
    sample = list(range(0, items.num_rows, max(1, items.num_rows // 40)))
    texts = items["text"].to_pylist()
    plain = ref.encode([texts[i] for i in sample])
    assert np.allclose(emb[sample], plain, atol=1e-4)  # same model, pooling, normalisation

    # unchanged texts: nothing to encode
    again = encode_stage(cfg, pdir)
    assert set(again.fields) == {"item"} and again.fields["item"]["encoded"] == 0
    # three changed item texts: only those are encoded, and only their vectors change
    changed = texts[:3] = [t + " Remastered." for t in texts[:3]]
    cols = {c: items[c] for c in items.column_names}
    cols["text"] = pa.array(changed + texts[3:], pa.large_string())
    pq.write_table(pa.table(cols), pdir / "items.parquet")
    third = encode_stage(cfg, pdir)
    assert third.fields["item"]["encoded"] == 3
    _, emb3 = load_embeddings(pdir, FeatureSpec.load(pdir), "item")
    assert not np.allclose(emb3[:3], emb[:3], atol=1e-3)
    assert np.array_equal(emb3[3:], emb[3:])
    assert np.allclose(emb3[:3], ref.encode(changed), atol=1e-4)
