"""feature_spec.json: the only contract between data and model.

Written by ``prepare``, read by ``train`` and ``serve``. Versioned: a reader refuses a spec whose
major version it does not know instead of guessing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mcl_ray.core.errors import SetupError

SPEC_VERSION = 1


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Feature(_Spec):
    name: str
    kind: Literal["categorical", "numeric", "text_embedding", "sequence", "item_sequence"]
    source: Literal["interaction", "user", "item", "context"]
    vocab_size: int | None = Field(None, description="categorical: ids 0..vocab_size-1, 0 is OOV/unknown/null")
    min_count: int | None = None
    hash_buckets: int | None = Field(None, description="categorical: ids are 1 + hash(value) mod hash_buckets "
                                     "(no vocabulary; 0 is null)")
    mean: float | None = Field(None, description="numeric: train-split mean used for normalisation")
    std: float | None = None
    dim: int | None = Field(None, description="text_embedding: embedding width")
    length: int | None = Field(None, description="sequence, item_sequence: entries per row (a fixed-size list, most "
                               "recent first)")
    ids_of: str | None = Field(None, description="sequence: the column whose ids it holds (the item feature's; "
                               "for the label, the label bucket column when bucketed); item_sequence: the user "
                               "feature's, or the label bucket column")


class TextField(_Spec):
    key: Literal["user_id", "item_id"]
    table: str = Field(description="parquet file (relative to the prepare dir) holding key and text")
    column: str = "text"
    template: str
    embedding: str | None = Field(None, description="embeddings file, filled in by the encode stage")
    generator: dict | None = Field(None, description="LLM-written texts (profile): model, backend, prompt_version, "
                                   "fingerprint")


class SyntheticData(_Spec):
    """LLM-generated training rows (augment stage): used for the training split only."""
    table: str = Field(description="parquet file (relative to the prepare dir), the training split's columns")
    rows: int
    generator: dict = Field(description="model, backend, prompt_version, temperature, seed")
    fingerprint: str


class FeatureSpec(_Spec):
    version: int = SPEC_VERSION
    features: list[Feature]
    scenario_column: str = "scenario"
    scenario_names: list[str]
    label_column: str = "label"
    weight_column: str = "weight"
    provenance_column: str = "is_synthetic"
    user_key: str = "user_key"
    item_key: str = "item_key"
    timestamp_column: str = "timestamp"
    soft_label_column: str | None = Field(None, description="the label's source value scaled to [0, 1] "
                                          "(prepare.label.soft), for train.soft_label; None: not stored")
    soft_label_range: tuple[float, float] | None = Field(None, description="the [min, max] rating that column was "
                                                         "scaled by (prepare.validation.rating_range); None: not "
                                                         "recorded (prepared before it was)")
    text: dict[str, TextField] = Field(default_factory=dict)
    synthetic: SyntheticData | None = Field(None, description="filled in by the augment stage")
    splits: dict[str, str] = Field(description="split name -> parquet folder relative to the prepare dir")
    num_rows: dict[str, int]
    users_table: str | None = "users.parquet"
    items_table: str | None = "items.parquet"
    vocabularies: str = "vocabs.json"
    data_fingerprint: str

    @classmethod
    def column(cls, field: str) -> str:
        """The column name a spec field names by default (e.g. column("label_column") -> "label"):
        what prepare writes, before a spec exists."""
        return cls.model_fields[field].default

    @property
    def categorical(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "categorical"]

    @property
    def numeric(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "numeric"]

    @property
    def sequence(self) -> list[Feature]:
        """Behaviour-history columns: item ids (ids_of a categorical feature) first, then label, then scenario."""
        cat = {f.name for f in self.categorical}
        return sorted((f for f in self.features if f.kind == "sequence"), key=lambda f: f.ids_of not in cat)

    @property
    def raters(self) -> list[Feature]:
        """Item-side behaviour columns (the target item's recent raters): user ids first, then label."""
        cat = {f.name for f in self.categorical}
        return sorted((f for f in self.features if f.kind == "item_sequence"), key=lambda f: f.ids_of not in cat)

    @property
    def num_scenarios(self) -> int:
        return len(self.scenario_names)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSpec":
        p = Path(path)
        if p.is_dir():
            p = p / "feature_spec.json"
        data = json.loads(p.read_text())
        if data.get("version") != SPEC_VERSION:
            raise SetupError(f"{p}: feature spec version {data.get('version')} is not supported "
                             f"(this mcl-ray reads version {SPEC_VERSION}); re-run `mcl-ray prepare`")
        return cls.model_validate(data)
