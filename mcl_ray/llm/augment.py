"""The augment stage: an LLM proposes extra positive/negative pairs for thin users (LLMRec style).

targets (scenario, few interactions, seeded sample) -> candidates (popular in the user's scenario
and unseen, mixed with random unseen items) -> prompt (history titles + genres, lettered
candidates; PROMPT_VERSION) -> backend (vllm | transformers, constrained to the answer shape) ->
parse + validate -> de-duplicate against every real interaction of the user -> synthetic rows.

Output in <prepare_dir>/augment/: synthetic.parquet (the training split's columns, is_synthetic=1,
weight 1; the trainer applies augment.weight), generations.parquet (every prompt, raw answer, parse
status: invalid answers are kept there, never silently dropped), stats.json; the feature spec
records it (`synthetic`). Synthetic rows are only ever added to the training split.

augment.scoring=pointwise replaces the lettered prompt by one prompt per candidate, scored
log P(Yes) - log P(No) (no generation, no letters): the best and worst scored candidates become the
like and dislike. The stats then count where the picks sat in the shown order (`answer_letters`, as
for the letters) and whether they were popular or random candidates.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mcl_ray.artifact import ArtifactError
from mcl_ray.core.config import ExperimentConfig
from mcl_ray.core.errors import ConfigError
from mcl_ray.core.feature_spec import FeatureSpec, SyntheticData
from mcl_ray.core.keys import key_array
from mcl_ray.core.ray_env import dataset_in_blocks
from mcl_ray.core.stage import fingerprint
from mcl_ray.data.history import ItemRaters, UserHistory, fixed_lists, rater_source_columns, source_columns
from mcl_ray.data.splits import read_pairs, read_split
from mcl_ray.llm.backends import generate_transformers, generate_vllm, score_transformers, score_vllm
from mcl_ray.llm.generator import GeneratorStage, request_blocks
from mcl_ray.llm.prompts import LABELS, POINTWISE_VERSION, PROMPT_VERSION, messages, parse_answer, pointwise_messages
from mcl_ray.models.encoder import encoder_fingerprint
from mcl_ray.serve.recommender import Query, Recommender

INVALID_REASONS = ("unparseable", "not_an_object", "missing_field", "outside_candidates", "same_choice", "no_answer")


class AugmentError(ConfigError):
    """The stage cannot run as configured; the message says why and what to change."""


@dataclass
class AugmentResult:
    stats: dict
    out_dir: Path
    cached: bool


def augment_fingerprint(cfg: ExperimentConfig, spec: FeatureSpec, model_fp: str, backend: str) -> str:
    blob = cfg.augment.model_dump(mode="json")
    for k in ("enabled", "weight", "denoise_share", "batch_size", "concurrency", "torch_threads", "use_gpu"):
        blob.pop(k)  # how (and whether) the rows are used or scheduled, not what is generated
    blob.update(data=spec.data_fingerprint, model=model_fp, prompt=prompt_version(cfg.augment), backend=backend)
    return fingerprint(blob)


def prompt_version(ac) -> str:
    return POINTWISE_VERSION if ac.scoring == "pointwise" else PROMPT_VERSION


# ----------------------------------------------------------------------------- requests


def read_train(spec: FeatureSpec, prepare_dir: Path) -> pd.DataFrame:
    """The training split with keys and timestamps: read once per stage, used for requests and rows."""
    return read_split(prepare_dir, spec, "train", extra=[spec.user_key, spec.item_key, spec.timestamp_column]).to_pandas()


def build_requests(cfg: ExperimentConfig, spec: FeatureSpec, prepare_dir: Path,
                   train: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per prompt: id, group (the user's n), user_key, scenario, candidate item keys,
    messages_json; a user per prompt (permutations: several), or per candidate (pointwise)."""
    ac = cfg.augment
    rng = np.random.default_rng(ac.seed)
    train = read_train(spec, prepare_dir) if train is None else train
    names = spec.scenario_names
    if ac.scenarios:
        unknown = sorted(set(ac.scenarios) - set(names))
        if unknown:
            raise AugmentError(f"augment.scenarios: unknown scenario(s) {unknown}; this data has {names}")
    targets_scen = {names.index(s) for s in (ac.scenarios or names)}
    u, i, sc = spec.user_key, spec.item_key, spec.scenario_column
    counts = train.groupby(u).size()
    user_scen = train.groupby(u)[sc].agg(lambda s: int(s.mode().iloc[0]))
    eligible = [k for k in counts.index if counts[k] <= ac.max_interactions and user_scen[k] in targets_scen]
    if not eligible:
        raise AugmentError(f"no user has <= {ac.max_interactions} train interactions in scenarios "
                           f"{sorted(names[s] for s in targets_scen)}; raise augment.max_interactions")
    chosen = sorted(rng.choice(np.array(eligible, dtype=object), min(ac.num_users, len(eligible)), replace=False))

    # without an items table (interactions only) the prompt names items by their key
    items = (pq.read_table(prepare_dir / spec.items_table).to_pandas() if spec.items_table
             else pd.DataFrame({"item_id": pd.Series(train[i].unique(), dtype=object)}))
    items["_key"] = key_array(pa.array(items["item_id"])).to_pylist()
    title = dict(zip(items["_key"], items["title"] if "title" in items else items["_key"]))
    genres = dict(zip(items["_key"], (items["genres"].astype(str).str.replace("|", ", ", regex=False)
                                      if "genres" in items else [""] * len(items))))
    trainable = set(train[i].unique())  # candidates need an item id (and its features) from train
    pos = train[train[spec.label_column] > 0]
    pop = {s: [k for k in pos[pos[sc] == s][i].value_counts().index] for s in targets_scen}
    all_items = np.array(sorted(trainable), dtype=object)
    seen = train.groupby(u)[i].apply(set)
    rows = []
    n_rand = ac.random_candidates
    top = model_top_n(ac.candidates_from, chosen, [names[int(user_scen[k])] for k in chosen],
                      ac.num_candidates - n_rand) if ac.candidates_from else {}
    for n, user in enumerate(chosen):
        s = int(user_scen[user])
        known = seen.get(user, set())
        hist = pos[pos[u] == user].sort_values(spec.timestamp_column, ascending=False)[i].head(ac.history_len)
        ranked = top.get(user) or pop[s]  # a user the model cannot score falls back to popularity
        popular = [k for k in ranked if k not in known and k in trainable][:ac.num_candidates - n_rand]
        rand: list = []
        while len(rand) < ac.num_candidates - len(popular) and len(rand) < len(all_items):
            k = all_items[rng.integers(len(all_items))]
            if k not in known and k not in popular and k not in rand:
                rand.append(k)
        cands = popular + rand
        rng.shuffle(cands)
        shown = [(title.get(k, k), genres.get(k, "")) for k in hist]
        if ac.scoring == "pointwise":  # one prompt per candidate; `position` is its place in the shuffled list
            for j, k in enumerate(cands):
                rows.append({"id": n * len(cands) + j, "group": n, "user_key": user, "scenario": s,
                             "candidates": [k], "n_candidates": 1, "position": j, "popular": k in popular,
                             "messages_json": json.dumps(pointwise_messages(shown, (title.get(k, k),
                                                                                    genres.get(k, ""))),
                                                         ensure_ascii=False)})
            continue
        for j, order in enumerate(permutations(len(cands), ac.permutations)):
            msgs = messages(shown, [(title.get(cands[o], cands[o]), genres.get(cands[o], "")) for o in order])
            rows.append({"id": n * ac.permutations + j, "group": n, "user_key": user, "scenario": s,
                         "candidates": [cands[o] for o in order], "n_candidates": len(cands),
                         "messages_json": json.dumps(msgs, ensure_ascii=False)})
    info = {"eligible_users": len(eligible), "train_rows": len(train)}
    return pd.DataFrame(rows), info


def permutations(n: int, k: int) -> list[list[int]]:
    """k orders of n candidates, cyclic shifts by multiples of n/k: with k <= n every candidate sits
    at a different letter in each order, so an answerer that always names the same letter never
    names the same item twice (k > n repeats letters; it is capped at n)."""
    k = min(k, n)
    return [[(i + j * n // k) % n for i in range(n)] for j in range(k)]


def model_top_n(artifact: str, users: list, scenarios: list[str], n: int) -> dict:
    """Each user's top-n unseen items from a trained model artifact (the serving core, no Serve)."""
    try:
        rec = Recommender(artifact)
    except (ArtifactError, FileNotFoundError) as e:
        raise AugmentError(f"augment.candidates_from: {e}") from None
    out = {}
    for start in range(0, len(users), 64):
        qs = [Query(user_id=u, scenario=s, k=n) for u, s in zip(users[start:start + 64], scenarios[start:start + 64])]
        for q, r in zip(qs, rec.recommend_many(qs)):
            if isinstance(r, dict):
                out[q.user_id] = [it["item_id"] for it in r["items"]]
    return out


# ----------------------------------------------------------------------------- generation


def generate(requests: pd.DataFrame, backend: str, model_path: Path, ac, bar=None) -> pd.DataFrame:
    """Run the backend over Ray Data; returns id, answer, generated_tokens (one row per request).
    The driver streams the answers and advances `bar` as they arrive."""
    table = pa.Table.from_pandas(requests[["id", "messages_json", "n_candidates"]], preserve_index=False)
    ds = dataset_in_blocks(table, request_blocks(len(requests), ac.batch_size))
    out = (generate_vllm if backend == "vllm" else generate_transformers)(ds, str(model_path), ac)
    parts = []
    for b in out.select_columns(["id", "answer", "generated_tokens"]).iter_batches(batch_format="pandas",
                                                                                  batch_size=None):
        parts.append(b)
        if bar is not None:
            bar.update(advance=len(b))
    return (pd.concat(parts, ignore_index=True) if parts
            else pd.DataFrame({"id": [], "answer": [], "generated_tokens": []}))


def score(requests: pd.DataFrame, backend: str, model_path: Path, ac, bar=None) -> pd.DataFrame:
    """Pointwise: run the scorer over Ray Data; returns id, score (streamed like `generate`)."""
    table = pa.Table.from_pandas(requests[["id", "messages_json"]], preserve_index=False)
    ds = dataset_in_blocks(table, request_blocks(len(requests), ac.batch_size))
    out = (score_vllm if backend == "vllm" else score_transformers)(ds, str(model_path), ac)
    parts = []
    for b in out.select_columns(["id", "score"]).iter_batches(batch_format="pandas", batch_size=None):
        parts.append(b)
        if bar is not None:
            bar.update(advance=len(b))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"id": [], "score": []})


# ----------------------------------------------------------------------------- postprocess


def postprocess_pointwise(requests: pd.DataFrame, scores: pd.DataFrame, real_pairs: set, spec: FeatureSpec,
                          train: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Per user (group): the best scored candidate becomes a synthetic positive, the worst a negative.
    A user with a missing or non-finite score, or whose candidates all score the same (an answerer
    that ignores the item), gets no pick. Stats as `postprocess`'s, the letters being the picks'
    places in the shown order; `picked_popular` counts picks among the popular (not random) candidates."""
    got = {int(i): float(v) for i, v in zip(scores["id"], scores["score"])}
    log, pairs = [], []
    invalid: Counter = Counter()
    letters = {"like": Counter(), "dislike": Counter()}
    popular = {"like": 0, "dislike": 0}
    duplicates = picks = groups = ties = 0
    for _, grp in requests.groupby("group", sort=True):
        groups += 1
        sc = np.array([got.get(int(i), np.nan) for i in grp["id"]])
        for r, v in zip(grp.itertuples(index=False), sc):
            status = "no_answer" if np.isnan(v) else ("unparseable" if not np.isfinite(v) else "valid")
            if status != "valid":
                invalid[status] += 1
            log.append({"id": r.id, "group": int(r.group), "user_key": r.user_key,
                        "candidates": json.dumps(list(r.candidates), ensure_ascii=False),
                        "messages_json": r.messages_json, "answer": "" if np.isnan(v) else f"{v:.6f}",
                        "generated_tokens": 0, "status": status})
        if not np.isfinite(sc).all():
            continue
        if sc.max() - sc.min() <= 1e-6:
            ties += 1
            continue
        first = grp.iloc[0]
        for what, j, label in (("like", int(np.argmax(sc)), 1.0), ("dislike", int(np.argmin(sc)), 0.0)):
            r = grp.iloc[j]
            picks += 1
            letters[what][LABELS[int(r["position"])]] += 1
            popular[what] += bool(r["popular"])
            item = r["candidates"][0]
            if (first.user_key, item) in real_pairs:
                duplicates += 1
            else:
                pairs.append((first.user_key, item, first.scenario, label))
    rows = synthetic_rows(pairs, spec, train)
    valid = np.array([v for v in got.values() if np.isfinite(v)])
    stats = pick_stats(requests, rows, spec, invalid, groups, picks, duplicates, letters, letters)
    stats.update(ties=ties, picked_popular=popular,
                 score={"mean": float(valid.mean()), "std": float(valid.std())} if len(valid) else None)
    return rows, pd.DataFrame(log), stats


def pick_stats(requests: pd.DataFrame, rows: pd.DataFrame, spec: FeatureSpec, invalid: Counter, groups: int,
               picks: int, duplicates: int, letters: dict, kept_letters: dict) -> dict:
    """The counts both scorings report; they add up: requested = answered + no_answer, answered =
    valid + invalid, picks = rows_written + duplicates_of_real."""
    answered = len(requests) - invalid["no_answer"]
    count = lambda c: {k: c[k] for k in sorted(c)}  # noqa: E731
    return {"requested": len(requests), "groups": groups, "answered": answered,
            "valid": answered - sum(v for k, v in invalid.items() if k != "no_answer"),
            "invalid": {k: invalid[k] for k in INVALID_REASONS if invalid[k]},
            "picks": picks, "duplicates_of_real": duplicates, "rows_written": len(rows),
            "positives": int((rows[spec.label_column] > 0).sum()) if len(rows) else 0,
            "negatives": int((rows[spec.label_column] == 0).sum()) if len(rows) else 0,
            "answer_letters": {w: count(c) for w, c in letters.items()},
            "kept_letters": {w: count(c) for w, c in kept_letters.items()}}


def postprocess(requests: pd.DataFrame, answers: pd.DataFrame, real_pairs: set, spec: FeatureSpec,
                train: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Parse and validate answers; synthetic positive/negative rows that are not real interactions.

    With augment.permutations > 1 a user's prompts form a group (the same candidates in shifted
    orders): a like (dislike) is kept only when every prompt of the group answered validly and named
    the same item. Returns (synthetic rows, generations log, stats). Stats add up: requested =
    answered + no_answer; answered = valid + invalid; picks = written + duplicates; the letter
    counts show the answers' position bias, over all valid answers and over the kept picks."""
    got = dict(zip(answers["id"], answers["answer"]))
    toks = dict(zip(answers["id"], answers["generated_tokens"]))
    log, pairs = [], []
    invalid: Counter = Counter()
    letters = {"like": Counter(), "dislike": Counter()}
    kept_letters = {"like": Counter(), "dislike": Counter()}
    duplicates = picks = groups = 0
    group_col = requests["group"] if "group" in requests else requests["id"]
    for _, grp in requests.assign(_group=group_col.to_numpy()).groupby("_group", sort=True):
        groups += 1
        chosen: dict[str, list] = {"like": [], "dislike": []}
        for r in grp.itertuples(index=False):
            text = got.get(r.id)
            parsed = parse_answer(text, r.n_candidates) if text is not None else None
            status = "no_answer" if parsed is None else (parsed.error or "valid")
            if status != "valid":
                invalid[status] += 1
            else:
                for what, idx in (("like", parsed.like), ("dislike", parsed.dislike)):
                    letters[what][LABELS[idx]] += 1
                    chosen[what].append((r.candidates[idx], LABELS[idx]))
            log.append({"id": r.id, "group": int(getattr(r, "group", r.id)), "user_key": r.user_key,
                        "candidates": json.dumps(list(r.candidates), ensure_ascii=False),
                        "messages_json": r.messages_json, "answer": "" if text is None else str(text),
                        "generated_tokens": int(toks.get(r.id, 0)), "status": status})
        first = grp.iloc[0]
        for what, label in (("like", 1.0), ("dislike", 0.0)):
            got_items = {item for item, _ in chosen[what]}
            if len(chosen[what]) != len(grp) or len(got_items) != 1:
                continue  # an invalid answer, or answers naming different items: no pick
            picks += 1
            kept_letters[what].update(letter for _, letter in chosen[what])
            item = chosen[what][0][0]
            if (first.user_key, item) in real_pairs:
                duplicates += 1
            else:
                pairs.append((first.user_key, item, first.scenario, label))
    rows = synthetic_rows(pairs, spec, train)
    stats = pick_stats(requests, rows, spec, invalid, groups, picks, duplicates, letters, kept_letters)
    return rows, pd.DataFrame(log), stats


def synthetic_rows(pairs: list[tuple], spec: FeatureSpec, train: pd.DataFrame) -> pd.DataFrame:
    """(user, item, scenario, label) -> rows with the training split's columns: user features from
    one of the user's train rows, item features from one of the item's train rows, context unknown (0)."""
    cols = list(train.columns)
    if not pairs:
        return train.iloc[:0][cols]
    src = {f.name: f.source for f in spec.categorical}
    user_cols = [c for c, s in src.items() if s == "user"]
    item_cols = [c for c, s in src.items() if s == "item"]
    by_user = train.drop_duplicates(spec.user_key).set_index(spec.user_key)
    by_item = train.drop_duplicates(spec.item_key).set_index(spec.item_key)
    p = pd.DataFrame(pairs, columns=[spec.user_key, spec.item_key, spec.scenario_column, spec.label_column])
    out = pd.DataFrame(0, index=p.index, columns=cols)
    for c in [f.name for f in spec.numeric]:
        out[c] = 0.0  # numeric features are z-normalised: 0 is the train mean
    out[spec.user_key] = p[spec.user_key].values
    out[spec.item_key] = p[spec.item_key].values
    out[user_cols] = by_user.loc[p[spec.user_key], user_cols].to_numpy()
    out[item_cols] = by_item.loc[p[spec.item_key], item_cols].to_numpy()
    out[spec.scenario_column] = p[spec.scenario_column].values
    out[spec.label_column] = p[spec.label_column].astype(np.float32).values
    if spec.soft_label_column:  # no rating of its own: its soft label is its label
        out[spec.soft_label_column] = out[spec.label_column]
    out[spec.weight_column] = np.float32(1.0)
    out[spec.provenance_column] = np.int8(1)
    out[spec.timestamp_column] = 0
    out = out.astype({c: t for c, t in train.dtypes.items() if c not in {f.name for f in spec.sequence + spec.raters}})
    if spec.sequence:  # behaviour history: the user's whole train history (a synthetic row has no time)
        mine = train[train[spec.user_key].isin(set(p[spec.user_key]))][source_columns(spec)]
        users = UserHistory(pa.Table.from_pandas(mine, preserve_index=False), spec)
        h = np.stack([users.of(u) for u in p[spec.user_key]])  # [n, 3, L]
        for j, f in enumerate(spec.sequence):
            out[f.name] = list(h[:, j])
    if spec.raters:  # item-side behaviour: the item's raters after every train row, for the same reason
        raters = ItemRaters(pa.Table.from_pandas(train[rater_source_columns(spec)], preserve_index=False), spec)
        r = raters.of(out[spec.sequence[0].ids_of].to_numpy())  # [n, 2, K]
        for j, f in enumerate(spec.raters):
            out[f.name] = list(r[:, j])
    return out


def rows_table(rows: pd.DataFrame, spec: FeatureSpec) -> pa.Table:
    """Synthetic rows as Arrow, the history columns as the train split's fixed-size lists."""
    seq = spec.sequence + spec.raters
    t = pa.Table.from_pandas(rows.drop(columns=[f.name for f in seq]), preserve_index=False)
    for f, dt in zip(seq, (pa.int32(), pa.int8(), pa.int16()) + (pa.int32(), pa.int8())):
        x = np.stack(rows[f.name].to_numpy()) if len(rows) else np.zeros((0, f.length), np.int64)
        t = t.append_column(f.name, fixed_lists(x, dt))
    return t


def real_interactions(spec: FeatureSpec, prepare_dir: Path, users: set) -> set:
    """(user, item) of every real interaction of these users, in every split: a synthetic pair that
    repeats one (possibly a held-out test pair with the opposite label) is dropped and counted."""
    t = read_pairs(prepare_dir, spec, spec.splits, users=users)
    return set(zip(t[spec.user_key].to_pylist(), t[spec.item_key].to_pylist()))


# ----------------------------------------------------------------------------- the stage


class AugmentStage(GeneratorStage[AugmentResult]):
    name = "augment"
    section = "augment"

    def fingerprint(self) -> str:
        return augment_fingerprint(self.cfg, self.spec, encoder_fingerprint(self.model_path), self.backend)

    def is_cached(self, fp: str) -> bool:  # a new prepare rewrites the spec without the synthetic rows
        return super().is_cached(fp) and self.spec.synthetic is not None

    def load_cached(self) -> AugmentResult:
        return AugmentResult(json.loads((self.out / "stats.json").read_text()), self.out, True)

    def compute(self, fp: str) -> AugmentResult:
        ac, spec = self.cfg.augment, self.spec
        train = read_train(spec, self.prepare_dir)
        requests, info = build_requests(self.cfg, spec, self.prepare_dir, train)
        self.say(f"augment: {len(requests):,} prompts ({info['eligible_users']:,} eligible users) -> {self.backend} "
                 f"with {ac.model} ({ac.concurrency} actor(s), batch {ac.batch_size})")
        tg = time.perf_counter()
        pointwise = ac.scoring == "pointwise"
        with self.progress("prompts scored" if pointwise else "prompts answered", len(requests), "prompts") as bar:
            answers = (score if pointwise else generate)(requests, self.backend, self.model_path, ac, bar)
        gen_s = time.perf_counter() - tg
        real = real_interactions(spec, self.prepare_dir, set(requests["user_key"]))
        rows, log, stats = (postprocess_pointwise if pointwise else postprocess)(requests, answers, real, spec, train)
        generator = {"model": ac.model, "backend": self.backend, "prompt_version": prompt_version(ac),
                     "scoring": ac.scoring, "temperature": ac.temperature, "seed": ac.seed}
        stats.update(fingerprint=fp, generator=generator, generation_seconds=gen_s,
                     prompts_per_s=len(requests) / gen_s if gen_s else None,
                     generated_tokens=int(answers["generated_tokens"].sum()) if "generated_tokens" in answers else 0,
                     seconds=time.perf_counter() - self.t0, **info)
        self.out.mkdir(exist_ok=True)
        pq.write_table(rows_table(rows, spec), self.out / "synthetic.parquet")
        pq.write_table(pa.Table.from_pandas(log, preserve_index=False), self.out / "generations.parquet")
        (self.out / "generator.json").write_text(json.dumps(generator, indent=1))
        spec.synthetic = SyntheticData(table="augment/synthetic.parquet", rows=len(rows), generator=generator,
                                       fingerprint=fp)
        spec.save(self.prepare_dir / "feature_spec.json")
        (self.out / "stats.json").write_text(json.dumps(stats, indent=1))
        self.say(f"augment: {stats['valid']}/{stats['requested']} valid answers, {stats['rows_written']} synthetic "
                 f"rows ({stats['positives']} positive, {stats['negatives']} negative), "
                 f"{stats['duplicates_of_real']} duplicates of real interactions dropped, "
                 f"invalid: {stats['invalid'] or 'none'}")
        return AugmentResult(stats, self.out, False)


def augment_stage(cfg: ExperimentConfig, prepare_dir: Path, force: bool = False, quiet: bool = False) -> AugmentResult:
    return AugmentStage(cfg, prepare_dir, force, quiet).run()
