"""The one typed experiment schema.

Every stage reads an :class:`ExperimentConfig`. Unknown keys are rejected everywhere
(``extra="forbid"``) so a misspelled key is an error, not a silently ignored default.
Each field's ``description`` is the documentation of that key (``mcl-ray config show --doc``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mcl_ray.core.errors import ConfigError  # noqa: F401  (re-exported: config errors are raised here)
from mcl_ray.core.storage import staging_dir


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ----------------------------------------------------------------------------- data sources


class TableRef(Strict):
    """A user's own table (parquet or CSV), with a mapping from canonical to file columns."""

    path: str = Field(description="File, folder or glob of parquet/CSV files (any pyarrow filesystem URI).")
    format: Literal["parquet", "csv"] = Field("parquet", description="File format.")
    delimiter: str = Field(",", description="CSV field delimiter (one character).", min_length=1, max_length=1)
    quote_char: str | None = Field('"', description="CSV quote character; null: fields are never quoted.",
                                   min_length=1, max_length=1)
    escape_char: str | None = Field(
        None, description="CSV escape character inside quoted fields (e.g. '\\' for \\\"); null: a quote is "
        "escaped by doubling it.", min_length=1, max_length=1)
    null_values: list[str] = Field(
        [""], description="CSV tokens read as null (e.g. ['', 'NULL', 'N/A']); everything else is a value.")
    encoding: str = Field("utf-8", description="CSV text encoding (any Python codec: utf-8, latin-1, cp1252, ...).")
    header: bool = Field(True, description="CSV: the first line names the columns; false: give column_names.")
    column_names: list[str] | None = Field(
        None, description="CSV without a header line: the names of its columns, in order.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Canonical column name -> column name in the file, for columns named differently.",
    )

    @field_validator("encoding")
    @classmethod
    def _codec(cls, v: str) -> str:
        import codecs

        try:
            return codecs.lookup(v).name
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r} (e.g. utf-8, latin-1, cp1252)") from None

    @model_validator(mode="after")
    def _names(self) -> "TableRef":
        if self.format == "csv" and not self.header and not self.column_names:
            raise ValueError("header: false needs column_names (the CSV's columns, in order)")
        return self


class MovieLensSource(Strict):
    source: Literal["movielens-1m", "movielens-100k"] = Field(description="MovieLens release.")
    path: str | None = Field(
        None,
        description="A GroupLens download folder (ml-1m: ratings.dat/users.dat/movies.dat; ml-100k: "
        "u.data/u.user/u.item). Null reads the RecBole atomic files from the registry package.",
    )
    max_interactions: int | None = Field(
        None, gt=0, description="Keep only the first N interactions (quick experiments and tests)."
    )


class TablesSource(Strict):
    source: Literal["tables"] = Field(description="Your own interactions/users/items tables.")
    interactions: TableRef = Field(description="Interactions: user_id, item_id, timestamp, and rating or label.")
    users: TableRef | None = Field(None, description="User attributes keyed by user_id (optional).")
    items: TableRef | None = Field(None, description="Item attributes keyed by item_id (optional).")


class SyntheticSource(Strict):
    source: Literal["synthetic"] = Field(description="Seeded multi-scenario data generated in parallel by Ray Data.")
    num_users: int = Field(10_000, gt=0, description="Users.")
    num_items: int = Field(2_000, gt=0, description="Items (each with a title and genres).")
    num_interactions: int = Field(200_000, gt=0, description="Interactions.")
    num_scenarios: int = Field(3, ge=1, le=26, description="Scenarios, with scenario-specific genre preferences.")
    num_blocks: int = Field(8, ge=1, description="Ray Data blocks the interactions are generated in.")
    seed: int = Field(0, description="Generator seed: same seed, same data.")


DataSource = Annotated[Union[MovieLensSource, TablesSource, SyntheticSource], Field(discriminator="source")]


# ----------------------------------------------------------------------------- prepare


SWR_AGE_GROUPS: dict[str, list[Any]] = {"s0_age_under25": [1, 18], "s1_age_25_34": [25], "s2_age_35plus": [35, 45, 50, 56]}


class ScenarioRule(Strict):
    column: str = Field(
        "age",
        description="Fused column that decides the scenario (a user, item or interaction column).",
    )
    groups: dict[str, list[Any]] | None = Field(
        default_factory=lambda: dict(SWR_AGE_GROUPS),
        description="Scenario name -> column values in it (default: Scenario-Wise Rec age groups). "
        "Null: the column's values are the scenario names themselves.",
    )
    names: list[str] | None = Field(
        None, description="With groups=null: the allowed scenario names, in index order (null: sorted values seen)."
    )

    @model_validator(mode="after")
    def _check(self) -> "ScenarioRule":
        if self.groups is not None:
            if self.names is not None:
                raise ValueError("give either scenario.groups or scenario.names, not both")
            if not self.groups:
                raise ValueError("scenario.groups is empty")
            seen: dict[str, str] = {}
            for name, values in self.groups.items():
                for v in values:
                    key = str(v)
                    if key in seen:
                        raise ValueError(f"value {v!r} is in scenario groups {seen[key]!r} and {name!r}")
                    seen[key] = name
        return self


class LabelRule(Strict):
    column: str = Field("rating", description="Column the label is derived from.")
    op: Literal["gt", "ge", "eq", "binary"] = Field(
        "gt", description="gt/ge/eq: label = column OP threshold; binary: the column already holds 0/1."
    )
    threshold: float | None = Field(3.0, description="Threshold for gt/ge/eq (SWR: rating > 3).")
    soft: bool = Field(False, description="Also store label_soft, the label's source value scaled to [0, 1] by "
                       "prepare.validation.rating_range (min 0, max 1), for train.soft_label (gt/ge/eq only).")

    @model_validator(mode="after")
    def _check(self) -> "LabelRule":
        if self.op != "binary" and self.threshold is None:
            raise ValueError(f"label.threshold is required with op={self.op!r}")
        return self


class CategoricalFeature(Strict):
    name: str = Field(description="Fused column to encode as a categorical id.")
    min_count: int = Field(1, ge=1, description="Values seen fewer times in the train split go to the OOV id 0.")
    hash_buckets: int | None = Field(
        None, ge=2, description="Hash values into this many ids instead of building a vocabulary (no per-value "
        "count reaches the driver; embedding rows are bounded). n distinct values share an id with another with "
        "probability 1 - (1 - 1/B)^(n-1) ~ 1 - exp(-n/B): 1M values in 4M buckets ~ 22%, in 16M ~ 6%.")

    @model_validator(mode="after")
    def _hash(self) -> "CategoricalFeature":
        if self.hash_buckets is not None and self.min_count != 1:
            raise ValueError(f"{self.name}: min_count needs a vocabulary; with hash_buckets leave it at 1")
        return self


# The MovieLens text templates: the default for MovieLens (and the MovieLens-shaped synthetic)
# sources only; a user's own tables have other columns, so their texts are theirs to write.
MOVIELENS_TEXT = {"item": "{title} ({year}). Genres: {genres}.",
                  "user": "A {age_text} {gender_text}, occupation: {occupation_text}, zip code {zip}."}


class TextTemplates(Strict):
    item: str | None = Field(
        None,
        description="Item text for the LLM encoder; {field} names an item column (any name without . [ ] : !, "
        "e.g. {Book-Author}). Null: no item text. movielens/synthetic sources default to "
        f"{MOVIELENS_TEXT['item']!r}.",
    )
    user: str | None = Field(
        None,
        description="User profile text; {field} names a user column. Null: no user text. movielens/synthetic "
        f"sources default to {MOVIELENS_TEXT['user']!r}.",
    )


class SplitConfig(Strict):
    kind: Literal["random", "temporal"] = Field("random", description="random: seeded per-row split (SWR); temporal: by time.")
    ratios: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/valid/test fractions.")
    seed: int = Field(2024, description="Seed of the random split.")
    temporal_mode: Literal["leave_last_out", "global_cut"] = Field(
        "leave_last_out",
        description="temporal: per-user last -> test, second last -> valid; or a global time cut at the ratios' quantiles.",
    )

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:
            raise ValueError(f"split.ratios must be non-negative, sum to 1 and have train > 0; got {list(v)}")
        return v


class ValidationConfig(Strict):
    policy: Literal["fail", "quarantine"] = Field(
        "fail", description="fail: stop with an error naming the problem; quarantine: move bad rows aside with a reason."
    )
    rating_range: tuple[float, float] | None = Field((1.0, 5.0), description="Allowed [min, max] rating (null: any).")
    max_examples: int = Field(5, ge=1, le=100, description="Example rows shown per problem in error messages.")


class HistoryConfig(Strict):
    length: int = Field(20, ge=1, le=500, description="L: a row's last L train-split interactions of its user, "
                        "strictly earlier in time (item id, label, scenario; most recent first).")
    item_feature: str = Field("item_id", description="The categorical feature whose ids the history holds (its "
                              "embedding table is shared with the history).")
    label_buckets: list[float] | None = Field(
        None, min_length=1, max_length=100,
        description="Entries carry the bucket of the label's source value (prepare.label.column, e.g. the rating) "
        "instead of the binary label: ascending boundaries, a value v goes to bucket 1 + (number of boundaries <= v). "
        "[1.5, 2.5, 3.5, 4.5] gives ratings 1..5 an id each. Null: the binary label (negative / positive).")
    raters: int = Field(0, ge=0, le=500, description="K: item-side behaviour, a row's target item's last K train-split "
                        "raters strictly earlier in time (their user ids and labels; columns raters_*), for "
                        "model.history.raters. 0: none.")
    user_feature: str = Field("user_id", description="raters: the categorical feature whose ids they hold (its "
                              "embedding table is shared with the target user's).")

    @model_validator(mode="after")
    def _buckets(self) -> "HistoryConfig":
        b = self.label_buckets
        if b is not None and any(x >= y for x, y in zip(b, b[1:])):
            raise ValueError(f"prepare.history.label_buckets must be strictly ascending, got {b}")
        return self


class PrepareConfig(Strict):
    scenario: ScenarioRule = Field(default_factory=ScenarioRule, description="How rows map to scenarios.")
    label: LabelRule = Field(default_factory=LabelRule, description="How the binary label is derived.")
    categorical: list[CategoricalFeature] = Field(
        default_factory=lambda: [
            CategoricalFeature(name=n)
            for n in ("user_id", "item_id", "gender", "occupation", "zip", "first_genre", "age")
        ],
        description="Categorical features (SWR set by default).",
    )
    numeric: list[str] = Field(default_factory=list, description="Numeric features, z-normalised on the train split.")
    context: list[Literal["hour", "weekday", "month"]] = Field(
        default_factory=list,
        description="Context features derived from the timestamp (UTC), added as categorical features.",
    )
    text: TextTemplates | None = Field(
        default_factory=TextTemplates, description="Text fields for the LLM stage (null: none)."
    )
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/valid/test split.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Input validation.")
    history: HistoryConfig | None = Field(
        None, description="Behaviour-history sequence features (list columns hist_*; needs a timestamp). Null: none.")

    @model_validator(mode="after")
    def _check(self) -> "PrepareConfig":
        names = [f.name for f in self.categorical] + list(self.numeric) + list(self.context)
        if self.history is not None and self.history.item_feature not in [f.name for f in self.categorical]:
            raise ValueError(f"prepare.history.item_feature {self.history.item_feature!r} is not a categorical "
                             "feature (the history holds its ids)")
        if self.history is not None and any(f.hash_buckets for f in self.categorical
                                            if f.name == self.history.item_feature):
            raise ValueError("prepare.history.item_feature must have a vocabulary, not hash_buckets")
        if self.label.soft and (self.label.op == "binary" or self.validation.rating_range is None):
            raise ValueError("prepare.label.soft scales the label's source value by prepare.validation.rating_range: "
                             "it needs label.op gt/ge/eq and a rating_range")
        if self.history is not None and self.history.raters and not any(
                f.name == self.history.user_feature and not f.hash_buckets for f in self.categorical):
            raise ValueError(f"prepare.history.user_feature {self.history.user_feature!r} must be a categorical "
                             "feature with a vocabulary (the raters hold its ids)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"features listed twice (categorical/numeric/context): {dup}")
        if self.label.column in names:
            raise ValueError(f"label column {self.label.column!r} is also a feature (label leakage)")
        return self


# ----------------------------------------------------------------------------- model / train / evaluate

BackboneName = Literal["single", "shared_bottom", "mmoe", "ple", "star", "pepnet", "m2m", "llm_ranker", "two_tower"]


class TextFeatureConfig(Strict):
    mode: Literal["off", "frozen", "finetune"] = Field(
        "off", description="off: no text features; frozen: the encode stage's embeddings through a learned "
        "projection (needs `mcl-ray encode`, run by `mcl-ray run`); finetune: the encoder inside the model, "
        "trained end to end (LoRA or its top layers).")
    fields: list[Literal["item", "user", "profile"]] = Field(
        ["item", "user"], min_length=1, description="Text fields used as features: item text, user text (the "
        "users table's attributes), profile (the LLM's summary of the user's train history: `mcl-ray profile`).")
    encoder: str = Field("all-MiniLM-L6-v2", description="finetune / llm_ranker: encoder (packaged default or local folder).")
    max_length: int = Field(32, ge=8, le=512, description="finetune / llm_ranker: tokens per text inside the model.")
    finetune: Literal["lora", "top_layers"] = Field("lora", description="finetune: LoRA adapters (peft) or unfreeze the top layers.")
    lora_r: int = Field(8, ge=1, le=256, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling alpha.")
    top_layers: int = Field(1, ge=1, description="top_layers: transformer layers trained (the rest stay frozen).")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


class HistoryFeatureConfig(Strict):
    pooling: list[Literal["din", "mean"]] = Field(
        default_factory=list, description="Fields made from the behaviour history (needs prepare.history): din "
        "(target attention over the history, DIN), mean (its mean). Empty: history unused.")
    attention_hidden: list[int] = Field([64, 32], min_length=1, description="din: widths of the attention MLP.")
    item_text: bool = Field(
        False, description="History entries and DIN's query also carry the item's text embedding (needs model.text "
        "frozen with the item field) through a projection of their own, so the attention compares items by content "
        "as well as by id.")
    encoder_layers: int = Field(
        0, ge=0, le=4, description="Self-attention (transformer encoder) layers over the history entries before the "
        "pooling, with a learned position embedding (BST, Chen et al. 2019), so each entry sees the others and its "
        "recency. 0: none.")
    raters: list[Literal["din", "mean"]] = Field(
        default_factory=list, description="Fields made from the target item's recent raters (needs "
        "prepare.history.raters): din (attention with the target user as query), mean. Empty: raters unused.")
    rater_table: Literal["shared", "own"] = Field(
        "shared", description="raters: the raters' user vectors come from the user feature's own table (shared, "
        "so DIN compares the target user with each rater) or from a table of their own (own).")


class ModelConfig(Strict):
    backbone: BackboneName = Field(
        "shared_bottom",
        description="single (one model per scenario), shared_bottom, mmoe, ple, star, pepnet or m2m; two_tower is the "
        "retrieval model (retrieval.model).")
    embedding_dim: int = Field(16, ge=1, le=1024, description="Width of every feature embedding (SWR: 16).")
    hidden: list[int] = Field([256, 128], min_length=1, description="Bottom / expert / shared MLP widths.")
    tower_hidden: list[int] = Field([64], description="Per-scenario tower widths (after the shared part).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout in MLPs.")
    num_experts: int = Field(4, ge=1, le=64, description="mmoe / m2m: shared experts.")
    specific_experts: int = Field(1, ge=1, le=16, description="ple: experts per scenario.")
    scenario_embedding_dim: int = Field(16, ge=1, description="star aux net / pepnet / m2m: scenario embedding width.")
    attention_heads: int = Field(2, ge=1, description="m2m: heads of the within-sample field attention.")
    cross_layers: int = Field(
        0, ge=0, le=8, description="DCN-v2 cross layers over the flattened input fields, before any backbone: "
        "x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, explicit feature crosses (e.g. user x item) that an MLP learns "
        "poorly. 0: none.")
    temperature: float = Field(0.05, gt=0, le=10, description="two_tower: softmax temperature of the cosine scores.")
    text: TextFeatureConfig = Field(default_factory=TextFeatureConfig,
                                    description="LLM semantic features (text embeddings of items and users).")
    history: HistoryFeatureConfig = Field(default_factory=HistoryFeatureConfig,
                                          description="Behaviour-history fields (DIN target attention, mean).")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.backbone == "m2m" and self.embedding_dim % self.attention_heads:
            raise ValueError(f"model.embedding_dim ({self.embedding_dim}) must be divisible by "
                             f"model.attention_heads ({self.attention_heads}) for m2m")
        if self.history.item_text and (self.text.mode != "frozen" or "item" not in self.text.fields):
            raise ValueError("model.history.item_text needs the item texts' embeddings: set model.text.mode=frozen "
                             "with item in model.text.fields")
        if self.history.encoder_layers and not self.history.pooling:
            raise ValueError("model.history.encoder_layers encodes the history for its pooling: set "
                             "model.history.pooling (e.g. [din, mean]) too")
        if self.backbone == "llm_ranker" and self.cross_layers:
            raise ValueError("model.cross_layers crosses feature fields; model.backbone=llm_ranker has none (it reads "
                             "the texts): set model.cross_layers to 0")
        if self.backbone == "llm_ranker" and self.text.mode != "off":
            raise ValueError("model.backbone=llm_ranker reads the texts itself (a cross-encoder); "
                             "set model.text.mode to off")
        return self


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1, description="Maximum epochs.")
    batch_size: int = Field(4096, ge=1, description="Global batch size (split across DDP workers).")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="Optimizer.")
    lr: float = Field(1e-3, gt=0, description="Learning rate.")
    weight_decay: float = Field(1e-5, ge=0, description="Weight decay (L2 for adam, decoupled for adamw).")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="LR schedule over the epochs.")
    sparse_embedding_rows: int = Field(
        100_000, ge=0, description="Id tables with at least this many rows get sparse gradients and a lazy Adam "
        "(SparseAdam: a step updates only the rows in the batch, so its cost does not grow with the table; no weight "
        "decay on them). CPU training only (NCCL has no sparse all-reduce). 0: every table dense.")
    patience: int = Field(4, ge=1, description="Early stopping: epochs without a better validation AUC.")
    soft_label: float = Field(
        0.0, ge=0.0, le=1.0, description="Train the ranking model towards (1 - a) * label + a * label_soft (the "
        "rating scaled to [0, 1]: prepare.label.soft), so it also learns how much a row was liked: a 5 above a 4, "
        "a 3 above a 1. Metrics stay on the binary label. 0: the binary label alone.")
    ordinal_cuts: list[float] = Field(
        default_factory=list, description="Ordinal targets next to the label (cumulative link): for each cut c, one "
        "more loss term P(rating > c) = sigmoid(logit + b_c), on the model's own logit with a learned offset b_c "
        "per cut, so the one score learns the whole order of ratings (a 5 above a 4, a 3 above a 1) while the "
        "label keeps its own loss term. Cuts in rating units, inside prepare.validation.rating_range and other than "
        "the label's threshold (ML-1M: [1, 2, 4]); needs prepare.label.soft and op gt. Synthetic (augment) rows, "
        "which have no rating, get no cut terms. []: none.")
    ordinal_weight: float = Field(0.5, gt=0, description="Weight of each ordinal_cuts loss term next to the "
                                  "label's (weight 1).")
    perturbation: Literal["none", "random", "fgm", "pgd"] = Field(
        "none", description="Embedding perturbation in training (robustness): random (Gaussian noise of norm "
        "perturbation_eps per row), fgm (one step along the loss gradient, norm perturbation_eps; trains on clean + "
        "adversarial loss) or pgd (perturbation_steps ascent steps projected on the eps ball).")
    perturbation_eps: float = Field(0.1, gt=0, description="Norm of the perturbation of a row's input embeddings "
                                                           "(all fields together).")
    perturbation_steps: int = Field(3, ge=1, le=20, description="pgd: ascent steps (each of size eps / steps * 2, projected).")
    seed: int = Field(2024, description="Seed of initialisation and shuffling.")
    num_workers: int = Field(1, ge=0, description="Ray Train DDP workers (0: run the loop in the driver).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend, autocast per `precision`.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="Where the workers go: PACK fills a node first; SPREAD / STRICT_SPREAD put them on "
        "different nodes (STRICT: fail rather than share a node).")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per worker (1 is fastest on small machines).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast dtype on GPU (CPU trains in fp32).")
    max_failures: int = Field(0, ge=-1, description="Ray Train FailureConfig.max_failures (-1: unlimited).")
    eval_batch_size: int = Field(65536, ge=1, description="Batch size for validation/test scoring.")
    data_mode: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: each worker turns its whole shard into tensors once (fastest); stream: "
        "workers iterate their Ray Data shard batch by batch through a local shuffle buffer (memory bounded by "
        "the buffer, any data size); auto: stream when a worker's shard would exceed memory_budget_mb.")
    memory_budget_mb: int = Field(2048, ge=1, description="auto: the most a worker's in-memory shard may take (MiB).")
    shuffle_buffer_rows: int = Field(
        200_000, ge=1, description="stream: rows of the local shuffle buffer (larger: better mixed, more memory).")
    sample_rows: dict[Literal["train", "valid", "test"], Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="Seeded random sample of rows per split (e.g. {train: 20000, valid: 2000, "
        "test: 5000}) for slow backbones such as llm_ranker on CPU; missing split: all rows.")
    holdout_scenarios: list[str] = Field(
        default_factory=list, description="Scenarios kept out of training and validation entirely (their "
        "parameters stay untrained): added later from few rows by `mcl-ray adapt`.")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.precision != "fp32" and not self.use_gpu:
            raise ValueError(f"train.precision={self.precision!r} needs train.use_gpu=true (CPU trains in fp32)")
        return self


class EvaluateConfig(Strict):
    top_k: list[int] = Field([10, 20], min_length=1, description="K for Recall/NDCG/HitRate/Precision/F1@K.")
    ranking_users: int = Field(2000, ge=0, description="Test users sampled per run for top-K ranking (0: skip).")
    exclude_seen: bool = Field(True, description="Ranking excludes items the user interacted with in train/valid.")
    fairness_groups: list[str] | None = Field(
        None, description="User attributes (columns of the users table) to report metrics by, with the max-min gap "
        "between their values. null: every user-side categorical feature with at most fairness_max_values values; "
        "[]: off.")
    fairness_max_values: int = Field(20, ge=2, description="Automatic fairness groups: attributes with at most this many values.")
    popularity_buckets: int = Field(3, ge=1, le=10, description="Item popularity buckets for top-K exposure (equal "
                                                                "shares of train interactions; 3: head, mid, tail).")


class RayConfig(Strict):
    address: str | None = Field(
        None, description="Cluster to join ('auto', 'ray://host:10001'); null starts a local one (or uses RAY_ADDRESS)."
    )
    num_cpus: int | None = Field(None, gt=0, description="Logical CPUs of a local cluster (null: all cores).")


class TrackingConfig(Strict):
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (http://host:5000, sqlite:////abs/mlflow.db, databricks): every "
        "training run and trial logs params and per-epoch metrics there (rank 0, Ray's setup_mlflow). null: off. "
        "TensorBoard event files are always written.")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment (null: the experiment name).")


# ----------------------------------------------------------------------------- encode


class EncodeConfig(Strict):
    model: str = Field("all-MiniLM-L6-v2", description="Text encoder: all-MiniLM-L6-v2 (packaged) or a local model folder.")
    batch_size: int = Field(64, ge=1, le=4096, description="Texts per encoder call.")
    concurrency: int | None = Field(None, ge=1, description="Encoder actors (Ray Data actor pool size); null: one "
                                    "per torch_threads CPUs of the Ray cluster (one per GPU with use_gpu), at most 8 "
                                    "and one per 1,500 texts.")
    torch_threads: int = Field(1, ge=1, description="torch threads (and CPUs reserved) per actor on CPU.")
    max_length: int = Field(128, ge=8, le=512, description="Tokens per text (longer texts are truncated).")
    use_gpu: bool = Field(False, description="One GPU per actor.")
    bf16: bool = Field(True, description="With use_gpu: run the encoder in bfloat16.")
    scope: Literal["vocab", "all"] = Field(
        "vocab", description="vocab: only users/items the model has an id for (seen in train); all: every row of "
        "the user/item tables.")


# ----------------------------------------------------------------------------- profile


class GenerationConfig(Strict):
    """What the LLM stages (profile, augment) share: the generator and how it is scheduled."""

    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="vllm (ray.data.llm engine workers), transformers (HF generate in an actor pool), "
        "auto: vllm when installed, else transformers.")
    model: str = Field("SmolLM2-135M-Instruct", description="Generator: the packaged SmolLM2 (GGUF, converted once) "
                       "or a local instruction-tuned causal LM folder.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature (0: greedy).")
    max_model_len: int = Field(2048, ge=256, description="vllm: context length of the engine.")
    batch_size: int = Field(16, ge=1, description="Prompts per backend call.")
    concurrency: int = Field(1, ge=1, description="Generator actors / engine replicas.")
    torch_threads: int = Field(1, ge=1, description="CPU threads (and CPUs reserved) per actor on CPU.")
    use_gpu: bool = Field(False, description="One GPU per actor / engine.")
    seed: int = Field(0, description="Seed of the user sample (augment: and candidates) and of generation.")


class ProfileConfig(GenerationConfig):
    liked: int = Field(10, ge=0, le=50, description="Liked train items shown in the prompt (most recent first).")
    disliked: int = Field(5, ge=0, le=50, description="Disliked train items shown in the prompt (most recent first).")
    max_new_tokens: int = Field(32, ge=4, le=256, description="Length cap of a profile (tokens): the cost of "
                                "profiling every user grows with it.")
    users: int | None = Field(None, ge=1, description="Profile a seeded sample of this many users (null: every user "
                              "with train rows); the others get no profile (the OOV text).")
    batch_size: int = Field(32, ge=1, description="Prompts per backend call.")


# ----------------------------------------------------------------------------- augment


class AugmentConfig(GenerationConfig):
    enabled: bool = Field(False, description="`mcl-ray run` runs augment, and training uses the synthetic rows.")
    scenarios: list[str] | None = Field(None, description="Target scenarios by name (null: all).")
    max_interactions: int = Field(30, ge=1, description="Target users with at most this many train interactions.")
    num_users: int = Field(200, ge=1, description="Target users sampled (seeded) among those eligible.")
    history_len: int = Field(10, ge=1, le=50, description="Liked train items shown in the prompt (most recent first).")
    num_candidates: int = Field(8, ge=2, le=20, description="Candidates per prompt (letters A..).")
    random_candidates: int = Field(3, ge=0, description="Of which random unseen items; the rest are popular in the "
                                   "user's scenario and unseen (or a model's top-N: candidates_from).")
    candidates_from: str | None = Field(
        None, description="A model artifact (e.g. runs/<name>/artifact): the non-random candidates are its top-N "
        "unseen items for the user in their scenario. null: popular in the user's scenario.")
    scoring: Literal["choice", "pointwise"] = Field(
        "choice", description="choice: one prompt per user, the LLM names the liked and disliked candidate letters "
        "(LLMRec). pointwise: one prompt per candidate, scored log P(Yes) - log P(No) with no letters; the best "
        "and worst scored candidates become the like and dislike (no position bias by construction; a user whose "
        "candidates all score the same gets none).")
    permutations: int = Field(1, ge=1, le=20, description="Against position bias: ask each user this many times, "
                              "the candidates cyclically shifted each time (every candidate at a different letter), "
                              "and keep a like/dislike only when every answer names the same item. 1: ask once.")
    denoise_share: float = Field(0.0, ge=0.0, lt=1.0, description="LLMRec's denoising: in each training batch, the "
                                 "synthetic rows with the highest loss, this share of them, get weight 0.")
    weight: float = Field(0.5, ge=0.0, description="Sample weight of synthetic rows in training (0: not used). "
                          "Applied at train time: changing it needs no new generation; tunable as augment.weight.")

    @model_validator(mode="after")
    def _check(self) -> "AugmentConfig":
        if self.scoring == "pointwise" and self.permutations > 1:
            raise ValueError("augment.permutations applies to scoring=choice; pointwise prompts show one candidate "
                             "each (no positions to shuffle): leave permutations at 1")
        if self.random_candidates >= self.num_candidates:
            raise ValueError(f"augment.random_candidates ({self.random_candidates}) must be below "
                             f"augment.num_candidates ({self.num_candidates})")
        return self


# ----------------------------------------------------------------------------- tune


class LogUniform(Strict):
    type: Literal["loguniform"] = Field(description="Distribution: loguniform, uniform, int or choice.")
    low: float = Field(gt=0, description="Lower bound (> 0).")
    high: float = Field(gt=0, description="Upper bound.")


class Uniform(Strict):
    type: Literal["uniform"] = Field(description="Distribution: loguniform, uniform, int or choice.")
    low: float = Field(description="Lower bound.")
    high: float = Field(description="Upper bound.")


class IntRange(Strict):
    type: Literal["int"] = Field(description="Distribution: loguniform, uniform, int or choice.")
    low: int = Field(description="Lower bound, inclusive.")
    high: int = Field(description="Upper bound, inclusive.")
    log: bool = Field(False, description="Sample on a log scale (low >= 1).")


class Choice(Strict):
    type: Literal["choice"] = Field(description="Distribution: loguniform, uniform, int or choice.")
    values: list[Any] = Field(min_length=1, description="Candidates (scalars, or lists such as layer widths).")


SearchParam = Annotated[Union[LogUniform, Uniform, IntRange, Choice], Field(discriminator="type")]

# Only what a trial may change: the data (prepare) stays fixed across a sweep.
TUNABLE_SECTIONS = ("model", "train", "augment")
UNTUNABLE = {"train.num_workers", "train.use_gpu", "train.cpus_per_worker", "train.max_failures",
             "train.eval_batch_size", "train.epochs", "train.seed", "train.holdout_scenarios"}
TUNABLE_AUGMENT = {"augment.weight"}  # the rest of augment changes the generated data, fixed per sweep


class TuneConfig(Strict):
    enabled: bool = Field(False, description="`mcl-ray run` runs this sweep instead of a single training run.")
    space: dict[str, SearchParam] = Field(
        default_factory=lambda: {
            "train.lr": LogUniform(type="loguniform", low=3e-4, high=1e-2),
            "train.weight_decay": LogUniform(type="loguniform", low=1e-7, high=1e-4),
            "model.dropout": Uniform(type="uniform", low=0.0, high=0.3),
        },
        description="Config key (model.* or train.*) -> distribution {type: loguniform|uniform|int|choice, ...}.",
    )
    num_samples: int = Field(16, ge=1, description="Trials.")
    include_default: bool = Field(
        True, description="The experiment's own config is the first trial, so the winner is never worse on validation.")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha: stop weak trials early; fifo: run all to the end.")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped.")
    reduction_factor: int = Field(3, ge=2, description="ASHA: keep the top 1/reduction_factor at each rung.")
    epochs: int | None = Field(None, ge=1, description="Epoch cap per trial (null: train.epochs).")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once (null: cluster CPUs // CPUs per trial).")
    seed: int = Field(0, description="Seed of the Optuna TPE sampler.")
    storage: str | None = Field(
        None, description="Optuna storage URL (e.g. sqlite:///runs/sweep.db) to keep the study for inspection.")
    time_budget_s: float | None = Field(None, gt=0, description="Stop starting trials after this many seconds.")

    @model_validator(mode="after")
    def _check(self) -> "TuneConfig":
        for key, p in self.space.items():
            where = f"tune.space.{key}"
            parts = key.split(".")
            if len(parts) != 2 or parts[0] not in TUNABLE_SECTIONS or (parts[0] == "augment" and key not in TUNABLE_AUGMENT):
                raise ValueError(f"{where}: searchable keys are model.<key>, train.<key> or augment.weight")
            if key in UNTUNABLE:
                raise ValueError(f"{where}: this key is fixed per sweep (set it in the experiment instead)")
            if isinstance(p, (LogUniform, Uniform, IntRange)) and not p.low < p.high:
                raise ValueError(f"{where}: low ({p.low}) must be below high ({p.high})")
            if isinstance(p, IntRange) and p.log and p.low < 1:
                raise ValueError(f"{where}: a log-scale int range needs low >= 1")
        return self


def _retrieval_model() -> ModelConfig:
    return ModelConfig(backbone="two_tower", embedding_dim=16, hidden=[128], tower_hidden=[64], dropout=0.0)


class RetrievalConfig(Strict):
    """The first stage of two-stage serving: a two-tower model and a nearest-neighbour index of its
    item vectors; the ranking model then scores only the retrieved candidates."""

    enabled: bool = Field(False, description="Train, evaluate and export a retrieval model next to the ranking model.")
    model: ModelConfig = Field(default_factory=_retrieval_model, description="The two-tower model (backbone two_tower).")
    epochs: int | None = Field(None, ge=1, description="Training epochs (null: train.epochs).")
    lr: float | None = Field(None, gt=0, description="Learning rate (null: train.lr).")
    weight_decay: float | None = Field(None, ge=0.0, description="Weight decay (null: train.weight_decay).")
    batch_size: int | None = Field(None, ge=2, description="Global batch size; larger means more in-batch negatives "
                                                           "(null: train.batch_size).")
    candidates: int = Field(500, ge=1, description="N: items retrieved per request and ranked (a request may ask "
                                                   "for fewer).")
    exact_below: int = Field(200_000, ge=0, description="Catalogues smaller than this get an exact index "
                                                        "(faiss IndexFlatIP); larger ones HNSW.")
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW: links per vector (memory vs recall).")
    hnsw_ef_construction: int = Field(200, ge=8, description="HNSW: candidate list while building.")
    hnsw_ef_search: int = Field(512, ge=8, description="HNSW: candidate list while searching (recall vs latency; "
                                                       "at least `candidates` is used).")

    @model_validator(mode="after")
    def _check(self) -> "RetrievalConfig":
        if self.model.backbone != "two_tower":
            raise ValueError(f"retrieval.model.backbone must be two_tower (got {self.model.backbone})")
        return self


class ExplainConfig(Strict):
    """Explanations of one (user, item, scenario) score: `/v1/explain` and `mcl-ray explain`."""

    steps: int = Field(32, ge=4, le=512, description="Integrated-gradients steps (more: attributions closer to "
                                                     "complete, slower; time grows linearly).")
    history_items: int = Field(3, ge=0, le=20, description="The user's train-history items most similar to the "
                                                           "explained item, shown as evidence.")
    generator: str = Field("SmolLM2-135M-Instruct", description="Writes the optional sentence: the packaged SmolLM2 "
                           "or a local instruction-tuned causal LM folder.")
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="Sentence backend: vllm (an engine in the serving replica), transformers (HF generate), "
        "auto: vllm when installed, else transformers.")
    max_new_tokens: int = Field(60, ge=8, le=256, description="Length cap of the sentence (tokens).")
    max_seconds: float = Field(10.0, gt=0, le=120, description="Time cap of writing the sentence; the answer says "
                                                               "when it was cut.")


class AdaptConfig(Strict):
    """Adding a scenario to a trained model from few labelled rows: `mcl-ray adapt`."""

    method: Literal["meta", "finetune", "scratch"] = Field(
        "meta", description="meta: the new scenario's parameters start from an initialisation meta-learned over the "
        "trained scenarios (first-order MAML: Reptile), then train on the k rows; finetune: they start from the mean "
        "of the trained scenarios' parameters, then train; scratch: a fresh model trained on the k rows alone "
        "(a baseline; it serves only the new scenario). meta and finetune change only the new scenario's parameters.")
    k: int = Field(1000, ge=2, description="Labelled rows of the new scenario used (a seeded sample of its train "
                                           "split).")
    valid_share: float = Field(0.2, gt=0, lt=1, description="Share of the k rows held back for early stopping "
                                                            "(the scenario's own validation split is not used).")
    new_ids: bool = Field(True, description="meta / finetune: also train the embedding rows of ids that no trained "
                          "scenario's train row uses (the new scenario's own users or items: a new user segment "
                          "brings its users). Only the new scenario's rows look those rows up.")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate of the adaptation.")
    batch_size: int = Field(256, ge=1, description="Rows per adaptation step (fewer when k is smaller).")
    max_steps: int = Field(600, ge=1, description="Most adaptation steps.")
    eval_every: int = Field(25, ge=1, description="Steps between early-stopping checks on the held-back rows (at "
                                                  "most one epoch over the fit rows).")
    patience: int = Field(4, ge=1, description="Checks without a better held-back AUC (logloss when those rows hold "
                                               "one label) before stopping; the best check's parameters are kept.")
    meta_steps: int = Field(400, ge=1, description="meta: Reptile outer steps (one trained scenario each).")
    inner_steps: int = Field(5, ge=1, description="meta: SGD steps per outer step (the adaptation it learns to "
                                                  "start).")
    inner_lr: float = Field(0.05, gt=0, description="meta: SGD learning rate of the inner steps.")
    outer_lr: float = Field(0.5, gt=0, le=1, description="meta: Reptile step size, annealed linearly to 0.")
    meta_rows: int = Field(20_000, ge=1, description="meta: rows sampled per trained scenario as its task data.")
    seed: int = Field(0, description="Seed of the row sample, initialisation and meta-learning.")


class ExperimentConfig(Strict):
    name: str = Field(description="Experiment name; the default run directory is runs/<name>.")
    run_dir: str | None = Field(None, description="Run directory (local path or pyarrow URI); null: runs/<name>.")
    data: DataSource = Field(description="Where the raw tables come from.")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="Validation, fusion, vocabularies, split.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training on Ray Train.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation metrics.")
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig, description="Retrieval stage of two-stage "
                                                                                    "serving.")
    explain: ExplainConfig = Field(default_factory=ExplainConfig, description="Explanations of scores (IG "
                                                                              "attributions, history, sentence).")
    adapt: AdaptConfig = Field(default_factory=AdaptConfig, description="Adding a scenario from few rows "
                                                                        "(`mcl-ray adapt`).")
    encode: EncodeConfig = Field(default_factory=EncodeConfig, description="Text encoder for semantic features.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="LLM data augmentation (synthetic rows).")
    profile: ProfileConfig = Field(default_factory=ProfileConfig, description="LLM user-interest profiles "
                                   "(model.text.fields: [..., profile]).")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Hyperparameter sweep (Ray Tune + Optuna).")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster to run on.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment tracking (MLflow).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("name may hold letters, digits, '_', '.', '-' (it names a directory)")
        return v

    @model_validator(mode="after")
    def _text_defaults(self) -> "ExperimentConfig":
        """MovieLens-shaped sources get the MovieLens templates for every field the config leaves
        unset; an explicit null switches a field off, whatever the source."""
        text = self.prepare.text
        if text is not None and self.data.source in ("movielens-1m", "movielens-100k", "synthetic"):
            for field, template in MOVIELENS_TEXT.items():
                if field not in text.model_fields_set:
                    setattr(text, field, template)
        return self

    @model_validator(mode="after")
    def _check_perturbation(self) -> "ExperimentConfig":
        if self.train.perturbation != "none" and self.model.backbone == "llm_ranker":
            raise ValueError("train.perturbation moves input embeddings, and model.backbone=llm_ranker has none "
                             "(it reads text tokens): set train.perturbation=none or another backbone")
        return self

    @model_validator(mode="after")
    def _check_ordinal(self) -> "ExperimentConfig":
        cuts, label = self.train.ordinal_cuts, self.prepare.label
        if not cuts:
            return self
        if not label.soft:
            raise ValueError("train.ordinal_cuts needs the rating of every row: set prepare.label.soft: true")
        if label.op != "gt":  # the label must be one more cut of the same kind (ge / eq are not "rating > c")
            raise ValueError(f"train.ordinal_cuts needs prepare.label.op: gt (the label is then the cut rating > "
                             f"threshold); it is {label.op!r}")
        lo, hi = self.prepare.validation.rating_range
        if len(set(cuts)) < len(cuts):
            raise ValueError(f"train.ordinal_cuts {cuts}: a cut is listed twice")
        for c in cuts:
            if not lo <= c < hi:
                raise ValueError(f"train.ordinal_cuts: cut {c} is outside [{lo}, {hi}) "
                                 "(prepare.validation.rating_range)")
            if c == label.threshold:
                raise ValueError(f"train.ordinal_cuts: cut {c} is the label's own threshold (prepare.label.threshold)")
        return self

    @model_validator(mode="after")
    def _check_text(self) -> "ExperimentConfig":
        uses = self.model.text.mode != "off" or self.model.backbone == "llm_ranker"
        if not uses:
            return self
        what = "model.backbone=llm_ranker" if self.model.backbone == "llm_ranker" else f"model.text.mode={self.model.text.mode}"
        if self.prepare.text is None:
            raise ValueError(f"{what} needs text fields: prepare.text must not be null")
        cat = {f.name for f in self.prepare.categorical}
        fields = ["item", "user"] if self.model.backbone == "llm_ranker" else self.model.text.fields
        hashed = {f.name for f in self.prepare.categorical if f.hash_buckets}
        for f in fields:
            key = "user_id" if f == "profile" else f"{f}_id"  # the profile is the user's, written by the LLM
            if key in hashed:
                raise ValueError(f"{what} with {f} text needs a vocabulary for {key} (texts are looked up by id); "
                                 f"drop its hash_buckets or the {f} text")
            if f != "profile" and getattr(self.prepare.text, f) is None:
                raise ValueError(f"{what} uses the {f} text (model.text.fields), but prepare.text.{f} is null: "
                                 f"write a template or drop {f} from model.text.fields")
            if key not in cat:
                raise ValueError(f"{what} with {f} text needs {key} in prepare.categorical (texts are looked up by its id)")
        return self

    @model_validator(mode="after")
    def _check_space(self) -> "ExperimentConfig":
        for key, p in self.tune.space.items():
            section, field = key.split(".")
            model = {"model": ModelConfig, "train": TrainConfig, "augment": AugmentConfig}[section]
            if field not in model.model_fields:
                raise ValueError(f"tune.space.{key}: unknown key (allowed in {section}: "
                                 f"{', '.join(k for k in model.model_fields if f'{section}.{k}' not in UNTUNABLE)})")
            values = p.values if isinstance(p, Choice) else [p.low, p.high]
            base = getattr(self, section).model_dump()
            for v in values:
                try:
                    model.model_validate({**base, field: v})
                except ValidationError as e:
                    first = e.errors()[0]
                    raise ValueError(f"tune.space.{key}: value {v!r} is not valid for {key}: {first['msg']}") from None
        return self

    def resolved_run_dir(self) -> str:
        """The local run directory: run_dir, runs/<name>, or the staging copy of a run_dir URI (storage.py)."""
        if self.run_dir and "://" in self.run_dir:
            return str(staging_dir(self.run_dir, self.name))
        return self.run_dir or str(Path("runs") / self.name)


# ----------------------------------------------------------------------------- loading


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid experiment config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]
                        if not (isinstance(p, str) and (p in _SOURCE_TAGS or p in _PARAM_TAGS))) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            allowed = _allowed_keys(e["loc"][:-1])
            if allowed:
                msg += f" (allowed here: {', '.join(allowed)})"
        lines.append(f"  {msg}" if path == "<root>" and msg.startswith("tune.") else f"  {path}: {msg}")
    return "\n".join(lines)


_SOURCE_TAGS = {"movielens-1m", "movielens-100k", "tables", "synthetic"}
_PARAM_TAGS = {"loguniform": LogUniform, "uniform": Uniform, "int": IntRange, "choice": Choice}


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at a location of ExperimentConfig, for 'unknown key' messages."""
    model: Any = ExperimentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if part in _SOURCE_TAGS:
            model = {"movielens-1m": MovieLensSource, "movielens-100k": MovieLensSource,
                     "tables": TablesSource, "synthetic": SyntheticSource}[part]
            continue
        if part in _PARAM_TAGS:
            model = _PARAM_TAGS[part]
            continue
        if "." in part:  # a tune.space key (a config path); the next part names its distribution
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _inner_model(model.model_fields[part].annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _inner_model(ann: Any) -> Any:
    for arg in getattr(ann, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'prepare.split.seed=7' -> (['prepare','split','seed'], 7); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = raw
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a valid list index")
                node = node[int(p)]
                continue
            if p not in node or node[p] is None:
                node[p] = {}
            if not isinstance(node[p], (dict, list)):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = node[p]
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: {last!r} is not a valid list index")
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def load_raw(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    raw = load_raw(path)
    if overrides:
        # Override onto the config with defaults filled in, so a key the file leaves at its
        # default (e.g. one element of the default feature list) can still be overridden.
        try:
            raw = ExperimentConfig.model_validate(raw).model_dump(mode="json")
        except ValidationError:
            pass  # the overrides may be what makes it valid; report errors after applying them
        raw = apply_overrides(raw, overrides)
    return validate_config(raw, str(path))


def validate_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_schema(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[str]:
    """One line per key: path, type, default, description (for `mcl-ray config show --doc`)."""
    lines: list[str] = []
    for name, f in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = f.annotation
        ann_s = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
        inner = _inner_model(ann)
        if inner is not None and name != "data":
            lines.append(f"{path}: {f.description or ''}")
            lines.extend(describe_schema(inner, path + "."))
        elif name == "data":
            lines.append(f"{path}: {f.description} One of:")
            for src in (MovieLensSource, TablesSource, SyntheticSource):
                lines.extend(describe_schema(src, path + "."))
        else:
            if len(default) > 80:
                default = default[:77] + "..."
            lines.append(f"{path} ({ann_s}; {default}): {f.description or ''}")
    return lines
