"""LLM semantic features inside the model, and the cross-encoder backbone `llm_ranker`.

Texts are looked up by the row's categorical id of `item_id` / `user_id`, so a batch needs no new
columns and serving scores the same batches as before. Row 0 (the OOV id) has no text: a zero
vector (frozen) or an empty text (finetune).

- frozen: the encode stage's embeddings sit in a non-trainable table [V, T] (saved with the weights,
  so an artifact needs no embeddings file); a learned Linear(T, D) makes them one more field.
- finetune: the encoder itself is a submodule (LoRA adapters via peft, or its top layers unfrozen);
  token ids of every text are buffers [V, L]; each batch encodes its unique ids once.
- llm_ranker: BERT-style cross-encoder over "[CLS] user text [SEP] item text [SEP]" with one logit,
  trained with the same BCE-with-logits loss as every backbone (the seed's version applied BCELoss
  to raw logits and passed token lists as labels).

Models with texts have `load_text(source)`: the trainer calls it after construction with the
prepared data's texts (`attach_texts`); an artifact's weights already hold the tables/tokens. The
model itself reads no files: it is plain torch plus the Hugging Face encoder it wraps.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn

from mcl_ray.core.config import ModelConfig, TextFeatureConfig
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.models.batch import Batch
from mcl_ray.models.encoder import EncoderError, check_encoder, resolve_encoder


class TextSource(Protocol):
    """Where a model's texts come from (the prepared data: mcl_ray.data.texts.PreparedTexts).
    Both return one entry per categorical id of `<field>_id`, id 0 (OOV) first."""

    def texts(self, field: str) -> list[str]: ...

    def embeddings(self, field: str) -> np.ndarray: ...  # [V, T] float32


def text_key(spec: FeatureSpec, field: str) -> str:
    """The categorical feature a text field is looked up by (item -> item_id; user, profile -> user_id)."""
    return spec.text[field].key if field in spec.text else f"{field}_id"


def key_index(spec: FeatureSpec, field: str) -> int:
    names = [f.name for f in spec.categorical]
    key = text_key(spec, field)
    if key not in names:
        raise EncoderError(f"{field} text features need the categorical feature {key} (texts are looked up by it)")
    return names.index(key)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, L, H], [N, L] -> L2-normalised mean over real tokens [N, H] (the MiniLM model card)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)


def load_encoder(tc: TextFeatureConfig, classifier: bool = False):
    """(model, tokenizer) from the packaged encoder or a local folder; clear errors otherwise."""
    import transformers
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_encoder(tc.encoder)
    check_encoder(path)
    transformers.logging.set_verbosity_error()  # "newly initialized classifier weights" is expected
    transformers.logging.disable_progress_bar()
    if classifier:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True)
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def make_trainable(encoder: nn.Module, tc: TextFeatureConfig) -> nn.Module:
    """LoRA adapters (peft) on the attention projections, or the top N transformer layers unfrozen."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    if tc.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in encoder.named_modules()}
        targets = ["query", "value"] if {"query", "value"} <= names else "all-linear"
        return get_peft_model(encoder, LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=0.0,
                                                  target_modules=targets))
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None:
        raise EncoderError(f"finetune=top_layers needs a BERT-like encoder (encoder.layer); got {type(encoder).__name__}")
    if tc.top_layers > len(layers):
        raise EncoderError(f"model.text.top_layers={tc.top_layers} but the encoder has {len(layers)} layers")
    for layer in layers[-tc.top_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return encoder


class TextFields(nn.Module):
    """The text fields of InputLayer: cat ids [B, F_cat] -> one [B, D] tensor per text field."""

    def __init__(self, spec: FeatureSpec, dim: int, tc: TextFeatureConfig):
        super().__init__()
        self.mode, self.fields, self.max_length = tc.mode, list(tc.fields), tc.max_length
        self.keys = {f: key_index(spec, f) for f in self.fields}
        vocab = {f: spec.categorical[self.keys[f]].vocab_size for f in self.fields}
        if self.mode == "frozen":
            feats = {f.name: f for f in spec.features if f.kind == "text_embedding"}
            missing = [f for f in self.fields if f"{f}_text" not in feats]
            if missing:
                raise EncoderError(f"model.text.mode=frozen needs embeddings of {missing}; run `mcl-ray encode` "
                                   "(mcl-ray run does it when model.text.mode is set)")
            self.tables = nn.ModuleDict({f: nn.Embedding(vocab[f], feats[f"{f}_text"].dim) for f in self.fields})
            for t in self.tables.values():
                nn.init.zeros_(t.weight)
                t.weight.requires_grad_(False)  # frozen: not in the optimizer, ignored by DDP
            self.proj = nn.ModuleDict({f: nn.Linear(feats[f"{f}_text"].dim, dim) for f in self.fields})
        else:  # finetune
            encoder, self.tokenizer = load_encoder(tc)
            self.encoder = make_trainable(encoder, tc)
            hidden = encoder.config.hidden_size
            for f in self.fields:  # token ids per categorical id, filled by load_text
                self.register_buffer(f"ids_{f}", torch.zeros(vocab[f], tc.max_length, dtype=torch.long))
                self.register_buffer(f"mask_{f}", torch.zeros(vocab[f], tc.max_length, dtype=torch.long))
            self.proj = nn.ModuleDict({f: nn.Linear(hidden, dim) for f in self.fields})

    @torch.no_grad()
    def load_text(self, source: TextSource) -> None:
        for f in self.fields:
            if self.mode == "frozen":
                self.tables[f].weight.copy_(torch.from_numpy(source.embeddings(f)))
            else:
                enc = self.tokenizer(source.texts(f), padding="max_length", truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                getattr(self, f"ids_{f}").copy_(enc["input_ids"])
                getattr(self, f"mask_{f}").copy_(enc["attention_mask"])

    def _encode(self, f: str, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:  # [U] -> [U, H]
        out = []
        for i in range(0, ids.shape[0], chunk):
            tok, mask = getattr(self, f"ids_{f}")[ids[i:i + chunk]], getattr(self, f"mask_{f}")[ids[i:i + chunk]]
            width = int(mask.sum(1).max().clamp(min=1))  # trim the padding every text of this chunk shares
            tok, mask = tok[:, :width], mask[:, :width]
            out.append(mean_pool(self.encoder(input_ids=tok, attention_mask=mask).last_hidden_state, mask))
        return torch.cat(out)

    def forward(self, cat: torch.Tensor) -> list[torch.Tensor]:
        fields = []
        for f in self.fields:
            ids = cat[:, self.keys[f]]  # [B]
            if self.mode == "frozen":
                fields.append(self.proj[f](self.tables[f](ids)))  # [B, T] -> [B, D]
            else:
                uniq, inv = torch.unique(ids, return_inverse=True)  # each text encoded once per batch
                fields.append(self.proj[f](self._encode(f, uniq))[inv])  # [U, H] -> [U, D] -> [B, D]
        return fields


class LLMRanker(nn.Module):
    """Cross-encoder click model: "[CLS] user text [SEP] item text [SEP]" -> one logit [B]."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig):
        super().__init__()
        tc = cfg.text
        self.model, self.tokenizer = load_encoder(tc, classifier=True)
        self.user_key, self.item_key = key_index(spec, "user"), key_index(spec, "item")
        tok = self.tokenizer
        if tok.cls_token_id is None or tok.sep_token_id is None:
            raise EncoderError(f"llm_ranker needs a BERT-style tokenizer with [CLS]/[SEP]; {tc.encoder} has none")
        self.cls_id, self.sep_id, self.pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id or 0
        # each side gets half the pair budget minus the 3 special tokens
        self.side = max(4, (tc.max_length * 2 - 3) // 2)
        for f, key in (("user", self.user_key), ("item", self.item_key)):
            v = spec.categorical[key].vocab_size
            self.register_buffer(f"{f}_ids", torch.zeros(v, self.side, dtype=torch.long))
            self.register_buffer(f"{f}_len", torch.zeros(v, dtype=torch.long))

    @torch.no_grad()
    def load_text(self, source: TextSource) -> None:
        for f in ("user", "item"):
            enc = self.tokenizer(source.texts(f), add_special_tokens=False, truncation=True,
                                 max_length=self.side, padding="max_length", return_tensors="pt")
            getattr(self, f"{f}_ids").copy_(enc["input_ids"])
            getattr(self, f"{f}_len").copy_(enc["attention_mask"].sum(1))

    def pairs(self, cat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pack [CLS] u [SEP] i [SEP] per row, left-aligned, vectorised (no Python loop over rows)."""
        u, i = cat[:, self.user_key], cat[:, self.item_key]
        u_tok, u_len = self.user_ids[u], self.user_len[u]  # [B, S], [B]
        i_tok, i_len = self.item_ids[i], self.item_len[i]
        b, s = u_tok.shape
        total = u_len + i_len + 3  # [B]
        width = int(total.max())
        out = u_tok.new_full((b, width + 1), self.pad_id)  # the last column takes the padding positions
        ar = torch.arange(s, device=cat.device).expand(b, s)
        dump = torch.full_like(ar, width)
        out.scatter_(1, torch.where(ar < u_len[:, None], ar + 1, dump), u_tok)
        out.scatter_(1, torch.where(ar < i_len[:, None], ar + u_len[:, None] + 2, dump), i_tok)
        rows = torch.arange(b, device=cat.device)
        out[rows, 0] = self.cls_id
        out[rows, u_len + 1] = self.sep_id
        out[rows, total - 1] = self.sep_id
        out = out[:, :width]
        pos = torch.arange(width, device=cat.device).expand(b, width)
        return {"input_ids": out, "attention_mask": (pos < total[:, None]).long(),
                "token_type_ids": ((pos >= (u_len + 2)[:, None]) & (pos < total[:, None])).long()}

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(**self.pairs(batch.cat)).logits.squeeze(-1)  # [B]


def check_text_inputs(cfg: ModelConfig, spec: FeatureSpec) -> None:
    """Before any worker starts: the texts/embeddings this model config needs are in the spec."""
    if cfg.backbone == "llm_ranker":
        need, emb = ["user", "item"], False
    elif cfg.text.mode != "off":
        need, emb = cfg.text.fields, cfg.text.mode == "frozen"
    else:
        return
    for f in need:
        key_index(spec, f)
        if f not in spec.text:
            if f == "profile":
                raise EncoderError("model.text.fields names profile, but the prepared data has no profiles: run "
                                   "`mcl-ray profile CONFIG` (`mcl-ray run` does it)")
            raise EncoderError(f"{f} text is not in the prepared data (prepare.text was null); re-run `mcl-ray prepare`")
        if emb and not any(x.name == f"{f}_text" and x.kind == "text_embedding" for x in spec.features):
            raise EncoderError(f"model.text.mode=frozen needs {f} text embeddings: run `mcl-ray encode CONFIG` "
                               "first (`mcl-ray run` does it)")


def attach_texts(model: nn.Module, source: TextSource) -> None:
    """Fill the text tables / token buffers of every part of `model` that has them."""
    for m in model.modules():
        if isinstance(m, (TextFields, LLMRanker)):
            m.load_text(source)
