"""The house rules: one-way imports (import-linter contract in pyproject.toml), every stage on the
Stage protocol, every user-facing error with its exit code."""

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_contract_is_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    p = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "1 kept, 0 broken" in p.stdout


def test_every_stage_uses_the_stage_protocol():
    from mcl_ray.artifact import ExportStage
    from mcl_ray.core.stage import Stage
    from mcl_ray.data.prepare import PrepareStage
    from mcl_ray.llm.augment import AugmentStage
    from mcl_ray.llm.encode import EncodeStage
    from mcl_ray.llm.profile import ProfileStage
    from mcl_ray.train.trainer import TrainSeed
    from mcl_ray.tune.sweep import TuneStage

    stages = [PrepareStage, ProfileStage, EncodeStage, AugmentStage, TrainSeed, TuneStage, ExportStage]
    assert all(issubclass(s, Stage) and not inspect.isabstract(s) for s in stages)
    assert sorted(s.name for s in stages) == ["augment", "encode", "export", "prepare", "profile", "train", "tune"]


def test_errors_carry_their_exit_code():
    from mcl_ray.artifact import ArtifactError
    from mcl_ray.core.errors import ConfigError, McrError, SetupError
    from mcl_ray.data.fuse import FusionError
    from mcl_ray.data.prepare import DataValidationError
    from mcl_ray.llm.augment import AugmentError
    from mcl_ray.llm.generator import GeneratorError
    from mcl_ray.models.encoder import EncoderError
    from mcl_ray.tune.sweep import SweepError

    codes = {e: e.exit_code for e in (ConfigError, SetupError, FusionError, AugmentError, GeneratorError,
                                      EncoderError, DataValidationError, SweepError, ArtifactError)}
    assert all(issubclass(e, McrError) for e in codes)
    # what the user must change in the config or environment: 2; data or a failed run: 1
    assert {e.__name__ for e, c in codes.items() if c == 2} == {
        "ConfigError", "SetupError", "FusionError", "AugmentError", "GeneratorError", "EncoderError"}


def test_stage_marker_reuse_and_force(tmp_path):
    """The protocol itself: compute once, reuse on the same fingerprint, recompute on --force or change."""
    from mcl_ray.core.config import validate_config
    from mcl_ray.core.stage import Marker, Stage

    calls = []

    class Count(Stage[int]):
        name = "count"
        uses_ray = False
        fp = "a"

        @property
        def marker(self):
            return Marker(tmp_path / "m.json")

        def fingerprint(self):
            return self.fp

        def load_cached(self):
            return -1

        def compute(self, fp):
            calls.append(fp)
            return len(calls)

    cfg = validate_config({"name": "t", "data": {"source": "synthetic"}})
    assert Count(cfg, quiet=True).run() == 1
    assert Count(cfg, quiet=True).run() == -1 and calls == ["a"]
    assert Count(cfg, force=True, quiet=True).run() == 2
    Count.fp = "b"
    assert Count(cfg, quiet=True).run() == 3 and calls == ["a", "a", "b"]
