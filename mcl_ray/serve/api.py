"""HTTP API schema (v1). Strict: unknown fields are rejected, sizes are bounded."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_K = 100
MAX_CANDIDATES = 10_000
MAX_ITEMS = 1000
MAX_BODY_BYTES = 64 * 1024

Key = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# A feature value in a request: text, an integer, or a finite number (numeric features)
Attr = Union[Annotated[str, StringConstraints(max_length=256)], int, Annotated[float, Field(allow_inf_nan=False)]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(Strict):
    user_id: Key = Field(description="User id as in the training data (e.g. '42').")
    scenario: Key = Field(description="Scenario name (GET /v1/model lists them).")
    k: int = Field(10, ge=1, le=MAX_K, description="Number of items to return.")
    exclude_seen: bool = Field(True, description="Leave out items the user already interacted with.")
    diversity: float = Field(0.0, ge=0.0, le=1.0, description="0: pure relevance; up to 1: MMR re-ranking for variety.")
    profile: dict[Key, Attr] | None = Field(
        None, max_length=32, description="User attributes (e.g. gender, age): override the stored ones; "
                                         "required for users unknown to the model (cold start).")
    context: dict[Key, Attr] | None = Field(None, max_length=32, description="Context features the model uses (e.g. hour).")
    candidates: int | None = Field(None, ge=1, le=MAX_CANDIDATES,
                                   description="Two-stage models: retrieve at most this many items to rank (default "
                                               "and ceiling: the model's retrieval.candidates; GET /v1/model).")
    as_of: int | None = Field(None, description="History models: the behaviour history as of this Unix time (the "
                                            "user's train interactions strictly earlier); default: all of them.")


class ScoreRequest(Strict):
    user_id: Key
    scenario: Key
    item_ids: list[Key] = Field(min_length=1, max_length=MAX_ITEMS, description="Candidates to score.")
    profile: dict[Key, Attr] | None = Field(None, max_length=32)
    context: dict[Key, Attr] | None = Field(None, max_length=32)
    as_of: int | None = Field(None, description="History models: the behaviour history as of this Unix time (the "
                                            "user's train interactions strictly earlier); default: all of them.")


class ExplainRequest(Strict):
    user_id: Key
    scenario: Key
    item_id: Key = Field(description="The item whose score to explain.")
    sentence: bool = Field(False, description="Also write one or two sentences with the generator, from the "
                                              "listed facts only (slower: seconds on CPU).")
    profile: dict[Key, Attr] | None = Field(None, max_length=32)
    context: dict[Key, Attr] | None = Field(None, max_length=32)
    as_of: int | None = Field(None, description="History models: the behaviour history as of this Unix time (the "
                                            "user's train interactions strictly earlier); default: all of them.")


class Item(BaseModel):
    item_id: str
    title: str
    score: float


class RecommendResponse(BaseModel):
    user_id: str
    scenario: str
    items: list[Item]
    model_version: str
    excluded_seen: int
    cold_start: bool
    retrieval: str = Field(description="index: the retrieval model's index chose the candidates; full_catalogue: "
                                       "every item was ranked (the artifact has no retrieval model).")
    candidates: int = Field(description="Items the ranking model scored.")
    timings_ms: dict[str, float] = Field(description="Milliseconds per stage (retrieve, rank, select) of the batch "
                                                     "this request was served in; also in the Server-Timing header.")


class Scored(BaseModel):
    item_id: str
    score: float


class ScoreResponse(BaseModel):
    user_id: str
    scenario: str
    model_version: str
    scores: list[Scored]


class ErrorResponse(BaseModel):
    detail: str


class FieldAttribution(BaseModel):
    field: str
    source: str = Field(description="user, item, context, interaction or text.")
    value: str | float | int | None = Field(description="The row's value (null: unknown / OOV).")
    attribution: float = Field(description="Integrated-gradients share of logit(row) - logit(baseline).")


class HistoryItem(BaseModel):
    item_id: str
    title: str
    similarity: float = Field(description="Cosine of the model's item embeddings.")
    liked: bool


class Sentence(BaseModel):
    sentence: str
    backend: str
    prompt_version: str
    facts: list[str] = Field(description="Everything the generator was told.")
    tokens: int
    seconds: float
    cut: bool = Field(description="The token or time cap ended the sentence.")


class ExplainResponse(BaseModel):
    user_id: str
    scenario: str
    model_version: str
    item: dict[str, str]
    score: float
    logit: float
    baseline_logit: float = Field(description="Every categorical feature OOV, every numeric at its train mean.")
    baseline_score: float
    convergence_delta: float = Field(description="sum(attributions) - (logit - baseline_logit): integration error.")
    fields: list[FieldAttribution] = Field(description="Per-field attributions, largest magnitude first.")
    similar_history: list[HistoryItem]
    explanation: Sentence | None = None
    timings_ms: dict[str, float]
