"""The augmentation prompt (versioned) and the parser of the model's answer.

The LLMRec recipe: show the LLM a user's history and a short list of candidates, ask which one the
user would like most and which least. Candidates are labelled with letters (one token each in
every tokenizer we use), the answer is JSON `{"like": "<letter>", "dislike": "<letter>"}`, and both
backends constrain decoding to exactly that shape (vLLM: JSON schema; transformers: the next token
restricted to the candidate letters). The parser still validates everything: a model or backend
that ignores the constraint costs a counted, quarantined answer, never a crash or a wrong row.

The 135M model named letter A 381 times in 400 whatever the candidates: the pointwise prompt asks
about one candidate at a time and reads the Yes/No log-probabilities instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

PROMPT_VERSION = "v1"
LABELS = "ABCDEFGHIJKLMNOPQRST"  # at most 20 candidates
MAX_TITLE = 100

SYSTEM = ("You are a movie recommendation assistant. You answer only with a JSON object naming one "
          "candidate letter the user would like most and one they would like least.")


def clean(text: str, limit: int = MAX_TITLE) -> str:
    """One line, bounded: a title can neither add prompt lines nor flood the context."""
    text = re.sub(r"\s+", " ", str(text or "")).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def user_message(history: list[tuple[str, str]], candidates: list[tuple[str, str]]) -> str:
    hist = "\n".join(f"- {clean(t)} ({clean(g, 60)})" for t, g in history) or "- (no history)"
    cands = "\n".join(f"{LABELS[i]}. {clean(t)} ({clean(g, 60)})" for i, (t, g) in enumerate(candidates))
    return (f"The user liked these movies:\n{hist}\n\nCandidate movies:\n{cands}\n\n"
            f"Which candidate would this user like most, and which least? Answer with JSON only: "
            f'{{"like": "<letter>", "dislike": "<letter>"}}')


def messages(history, candidates) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_message(history, candidates)}]


# Pointwise scoring (augment.scoring=pointwise): one prompt per candidate, no letters, so the answer
# cannot lean on a position. The score is log P(YES) - log P(NO) for the answer's first token.
POINTWISE_VERSION = "p1"
YES, NO = "Yes", "No"
POINTWISE_SYSTEM = "You are a movie recommendation assistant. You answer only Yes or No."


def pointwise_messages(history: list[tuple[str, str]], candidate: tuple[str, str]) -> list[dict]:
    hist = "\n".join(f"- {clean(t)} ({clean(g, 60)})" for t, g in history) or "- (no history)"
    title, genres = candidate
    return [{"role": "system", "content": POINTWISE_SYSTEM},
            {"role": "user", "content": f"The user liked these movies:\n{hist}\n\nWould this user like the movie "
                                        f"{clean(title)} ({clean(genres, 60)})? Answer Yes or No."}]


def json_schema(n: int) -> dict:
    letters = list(LABELS[:n])
    return {"type": "object", "properties": {"like": {"type": "string", "enum": letters},
                                             "dislike": {"type": "string", "enum": letters}},
            "required": ["like", "dislike"], "additionalProperties": False}


@dataclass(frozen=True)
class Parsed:
    like: int | None = None
    dislike: int | None = None
    error: str | None = None  # unparseable | not_an_object | missing_field | outside_candidates | same_choice

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_answer(text, n: int) -> Parsed:
    """The model's raw text -> candidate indices, or the reason it is invalid. Never raises."""
    if not isinstance(text, str) or not text.strip():
        return Parsed(error="unparseable")
    s = text.strip()
    try:
        obj = json.loads(s)
    except ValueError:
        m = re.search(r"\{[^{}]*\}", s)  # a JSON object wrapped in prose or code fences
        if m is None:
            return Parsed(error="unparseable")
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            return Parsed(error="unparseable")
    if not isinstance(obj, dict):
        return Parsed(error="not_an_object")
    if "like" not in obj or "dislike" not in obj:
        return Parsed(error="missing_field")
    idx = []
    for key in ("like", "dislike"):
        v = obj[key]
        if not isinstance(v, str) or len(v.strip()) != 1 or v.strip().upper() not in LABELS[:n]:
            return Parsed(error="outside_candidates")
        idx.append(LABELS.index(v.strip().upper()))
    if idx[0] == idx[1]:
        return Parsed(error="same_choice")
    return Parsed(like=idx[0], dislike=idx[1])
