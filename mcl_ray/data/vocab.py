"""Vocabularies (vocabs.json): feature -> train values; id = position + 1, id 0 = OOV/unknown/null.

The one place values become ids, for the prepare stage's batches, evaluation, serving and the
text tables of the models."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.core.keys import key_array


def ids_of(values: pa.Array | pa.ChunkedArray, vocab: pa.Array) -> pa.Array:
    """Canonical keys of `values` -> ids (int64, 0 for values not in `vocab`)."""
    idx = pc.index_in(key_array(values), value_set=vocab)
    return pc.cast(pc.add(pc.fill_null(idx, -1), 1), pa.int64())


class Vocabularies:
    def __init__(self, values: dict[str, list[str]]):
        self.values = values

    @classmethod
    def load(cls, folder: str | Path, spec: FeatureSpec) -> "Vocabularies":
        return cls(json.loads((Path(folder) / spec.vocabularies).read_text()))

    @cached_property
    def _arrays(self) -> dict[str, pa.Array]:
        return {f: pa.array(v, pa.string()) for f, v in self.values.items()}

    @cached_property
    def _lookup(self) -> dict[str, dict[str, int]]:
        return {f: {v: i + 1 for i, v in enumerate(vs)} for f, vs in self.values.items()}

    def ids(self, feature: str, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Vectorised: a column of raw values -> ids [N] int64."""
        return ids_of(values, self._arrays[feature]).to_numpy()

    def id(self, feature: str, value) -> int:
        """One value (a request field) -> its id; an unseen value is the OOV id 0, as in training."""
        return self._lookup[feature].get(str(value), 0)

    def keys(self, feature: str) -> list[str | None]:
        """Key of every id of `feature` (id 0, OOV: None)."""
        return [None] + list(self.values[feature])


def encode_entities(table: pa.Table, key: str, spec: FeatureSpec, vocabs: Vocabularies,
                    source: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """The categorical features that come from a user (or item) table, as ids, one row per entity:
    (keys, {feature: ids [N]})."""
    cols = {f.name: vocabs.ids(f.name, table[key if f.name == key else f.name])
            for f in spec.categorical if f.source == source}
    return key_array(table[key]).to_pylist(), cols
