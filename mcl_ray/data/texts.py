"""The prepared texts and their embeddings, in categorical-id order (what a model's text tables
hold). Implements models.text.TextSource for the trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mcl_ray.core.errors import SetupError
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.core.keys import key_array
from mcl_ray.data.vocab import Vocabularies


def load_embeddings(prepare_dir: str | Path, spec: FeatureSpec, field: str) -> tuple[list[str], np.ndarray]:
    """(keys, [N, T] embeddings) written by the encode stage for a text field."""
    tf = spec.text[field]
    if tf.embedding is None:
        raise SetupError(f"no embeddings for text field {field!r}; run `mcl-ray encode` first")
    t = pq.read_table(Path(prepare_dir) / tf.embedding)
    return t["key"].to_pylist(), np.stack(t["embedding"].to_numpy(zero_copy_only=False))


class PreparedTexts:
    """Texts and embeddings of a prepare folder, one row per categorical id (id 0, OOV: empty/zeros)."""

    def __init__(self, prepare_dir: str | Path, spec: FeatureSpec):
        self.dir, self.spec = Path(prepare_dir), spec
        self.vocabs = Vocabularies.load(prepare_dir, spec)

    def _by_key(self, field: str) -> dict[str, str]:
        if field not in self.spec.text:
            raise SetupError(f"the feature spec has no {field!r} text (prepare.text was null when it was prepared)")
        tf = self.spec.text[field]
        t = pq.read_table(self.dir / tf.table, columns=[tf.key, tf.column])
        return dict(zip(key_array(t[tf.key]).to_pylist(), (x or "" for x in t[tf.column].to_pylist())))

    def texts(self, field: str) -> list[str]:
        texts = self._by_key(field)
        return ["" if k is None else texts.get(k, "") for k in self.vocabs.keys(self.spec.text[field].key)]

    def embeddings(self, field: str) -> np.ndarray:
        keys, emb = load_embeddings(self.dir, self.spec, field)
        pos = {k: i for i, k in enumerate(keys)}
        vk = self.vocabs.keys(self.spec.text[field].key)
        table = np.zeros((len(vk), emb.shape[1]), np.float32)
        hits = [(j, pos[k]) for j, k in enumerate(vk) if k is not None and k in pos]
        if not hits:
            raise SetupError(f"no {field} id of the vocabulary has an embedding; re-run `mcl-ray encode`")
        rows, src = zip(*hits)
        table[list(rows)] = emb[list(src)]
        return table
