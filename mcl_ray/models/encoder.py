"""Text encoder for semantic features: a Hugging Face encoder, pooled and normalised as its model
card prescribes (all-MiniLM-L6-v2: mean pooling over tokens, then L2 normalisation).

`TextEncoder` is a plain callable class so the same code runs in a single process (the reference
loop in tests and benchmarks) and as a Ray Data actor (`map_batches(TextEncoder, ...)`).
"""

from __future__ import annotations

from mcl_ray.core.errors import SetupError

import hashlib
import json
from pathlib import Path

import numpy as np

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


class EncoderError(SetupError):
    """An encoder that cannot be used; the message says what is wrong and what to do."""


def resolve_encoder(name: str) -> Path:
    """`all-MiniLM-L6-v2` (the registry package), or a local folder. No hub at run time here."""
    if name in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        from mcl_ray.data import package_data

        return package_data.locate(package_data.MINILM)
    p = Path(name).expanduser()
    if not p.is_dir():
        raise EncoderError(f"encoder {name!r} not found: give a local model folder (config.json, tokenizer, "
                           f"weights) or {DEFAULT_ENCODER!r} (the packaged default)")
    return p


def check_encoder(path: Path) -> dict:
    """Refuse folders that are not a text encoder, before any Ray actor tries to load them."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise EncoderError(f"{path}: no config.json; not a Hugging Face model folder")
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    if cfg.get("is_decoder") or any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                                    for a in archs):
        raise EncoderError(f"{path}: {archs or cfg.get('model_type')} is a generative (decoder) model, not a text "
                           "encoder; use an encoder such as all-MiniLM-L6-v2 (BERT-like, mean pooled)")
    if not any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise EncoderError(f"{path}: no tokenizer files (tokenizer.json / vocab.txt)")
    if "hidden_size" not in cfg:
        raise EncoderError(f"{path}: config.json has no hidden_size; not a transformer text encoder")
    return cfg


def encoder_fingerprint(path: Path) -> str:
    """Digest of config + weights: a changed model invalidates every cached embedding."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".txt") and f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:20]


def text_hash(texts) -> list[str]:
    return [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]


class TextEncoder:
    """texts -> L2-normalised mean-pooled embeddings [N, H] (float32)."""

    def __init__(self, path: str, max_length: int = 128, device: str = "cpu", bf16: bool = False,
                 torch_threads: int = 1):
        import torch
        import transformers
        from transformers import AutoModel, AutoTokenizer

        transformers.logging.disable_progress_bar()  # one "Loading weights" bar per actor clutters the log
        torch.set_num_threads(torch_threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        dtype = torch.bfloat16 if bf16 else torch.float32
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).train(False)
        self.device, self.max_length = device, max_length

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        enc = self.tok(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state.float()  # [N, T, H]
        mask = enc["attention_mask"].unsqueeze(-1).float()  # [N, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens
        return torch.nn.functional.normalize(pooled, dim=1).cpu().numpy().astype(np.float32)

    def __call__(self, batch: dict) -> dict:  # Ray Data map_batches (numpy format)
        emb = self.encode([str(t) for t in batch["text"]])
        return {"key": batch["key"], "text_hash": batch["text_hash"], "embedding": emb}
