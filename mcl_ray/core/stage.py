"""The stage protocol shared by prepare, encode, augment, train, tune and export.

A stage hashes its inputs (config sections, data fingerprint, model files) to a fingerprint. A
marker file next to its output records the fingerprint that produced it, written last, so it also
says "complete". Same fingerprint and no --force: the output is reused. The driver-side
`execute` gives every stage the same order of work: Ray when needed -> metadata entry -> run ->
push to shared storage; its console lines and progress bars go through `Stage.say`/`progress`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Generic, Iterable, TypeVar

from mcl_ray.core import storage
from mcl_ray.core.config import ExperimentConfig
from mcl_ray.core.progress import ProgressBar, console
from mcl_ray.core.provenance import write_run_metadata
from mcl_ray.core.ray_env import init_ray

R = TypeVar("R")


def fingerprint(*parts: Any, files: Iterable[str | Path] = ()) -> str:
    """sha256 over JSON-able parts and the (path, size, mtime) of files; 20 hex digits."""
    payload = parts[0] if len(parts) == 1 else list(parts)  # one part: the same digest as before this module
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        except FileNotFoundError:
            h.update(f"{f}|missing".encode())
    return h.hexdigest()[:20]


class Marker:
    """`<output>/<name>.json` = {"fingerprint": ..., **extra}; written atomically after the output."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def matches(self, fp: str, **extra: Any) -> bool:
        got = self.read()
        return got is not None and got.get("fingerprint") == fp and all(got.get(k) == v for k, v in extra.items())

    def write(self, fp: str, **extra: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, **extra}))
        os.replace(tmp, self.path)


class Stage(ABC, Generic[R]):
    """One pipeline stage. Subclasses say what their inputs hash to, where the marker is, how to
    load a reused output and how to compute a new one; `run` does the rest the same way for all."""

    name: ClassVar[str]
    uses_ray: ClassVar[bool] = True

    def __init__(self, cfg: ExperimentConfig, force: bool = False, quiet: bool = False):
        self.cfg, self.force, self.quiet = cfg, force, quiet
        self.t0 = time.perf_counter()  # reset by run(): step times count from the stage's own start
        self._steps = 0

    # ---- what each stage defines
    @abstractmethod
    def fingerprint(self) -> str: ...

    @property
    @abstractmethod
    def marker(self) -> Marker: ...

    @abstractmethod
    def load_cached(self) -> R: ...

    @abstractmethod
    def compute(self, fp: str) -> R:
        """Write the output (the marker is written by `run` after this returns)."""

    def marker_extra(self) -> dict:
        """Values besides the fingerprint that must match for reuse (e.g. the epoch cap)."""
        return {}

    def data_fingerprint(self) -> str | None:
        """The prepared data this stage reads (recorded in the run metadata)."""
        return None

    # ---- the same for every stage
    def say(self, msg: str) -> None:
        if not self.quiet:
            console.print(msg)

    def step(self, what: str, detail: str = "") -> None:
        """A numbered step line with the time since the stage started."""
        self._steps += 1
        self.say(f"[bold cyan]{self.name}[{self._steps}][/] {what} {detail}  "
                 f"[dim](+{time.perf_counter() - self.t0:.1f}s)[/]")

    def progress(self, description: str, total: int | None, unit: str):
        """A live progress bar (rich) on the console; a single summary line when not a terminal."""
        return ProgressBar(f"{self.name}: {description}", total, unit, disabled=self.quiet)

    def is_cached(self, fp: str) -> bool:
        return not self.force and self.marker.matches(fp, **self.marker_extra())

    def run_root(self) -> Path:
        """The run directory whose metadata.json this stage appends to (and pushes when a URI)."""
        return Path(self.cfg.resolved_run_dir())

    def run(self) -> R:
        self.t0 = time.perf_counter()
        fp = self.fingerprint()
        if self.is_cached(fp):
            self.say(f"[green]{self.name}: inputs and config unchanged (fingerprint {fp}); reusing "
                     f"{self.marker.path.parent}")
            return self.load_cached()
        result = self.compute(fp)
        self.marker.write(fp, **self.marker_extra())
        return result


def execute(stage: Stage[R]) -> R:
    """Run a stage from the driver: join/start Ray if it needs it, append the metadata entry, run,
    then push the staged run directory to `run_dir` when that is a URI (shared storage)."""
    cfg = stage.cfg
    local = stage.run_root()
    if stage.uses_ray:
        init_ray(cfg.ray, local.parent, log_dir=local)
    write_run_metadata(local, cfg, stage.name, stage.data_fingerprint())
    result = stage.run()
    # only the staged copy of the config's own run_dir is pushed (an export elsewhere is not)
    if cfg.run_dir and "://" in cfg.run_dir and local.resolve() == Path(cfg.resolved_run_dir()).resolve():
        n = storage.push(local, cfg.run_dir)
        stage.say(f"run_dir {cfg.run_dir}: {n} file(s) pushed")
    return result
