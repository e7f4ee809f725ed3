"""Run directories on shared storage: `run_dir` may be any pyarrow filesystem URI (file://, s3://,
gs://, hdfs://, abfs://). Stages work in a local staging copy (they read and write many small
files, parquet, safetensors); the CLI pulls the remote run directory before a command, so finished
stages are found and skipped, and pushes after every stage, so a crash loses at most the stage
that was running. A plain path is used in place, as before.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SKIP_DIRS = {"ray_results"}  # Ray Train's own run state: large, and rebuilt from checkpoint/ on resume


def staging_dir(uri: str, name: str) -> Path:
    """Local working copy of a remote run directory (MCL_RAY_STAGING, default ~/.cache/mcl-ray/staging)."""
    root = Path(os.environ.get("MCL_RAY_STAGING", Path.home() / ".cache" / "mcl-ray" / "staging"))
    return root / f"{name}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}"


def _fs(uri: str):
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 (pyarrow raises several types for unknown schemes/credentials)
        raise ValueError(f"run_dir {uri!r}: pyarrow cannot open this URI ({e})") from None


def pull(uri: str, local: Path) -> int:
    """Copy the remote run directory's files that differ into `local`; returns files copied."""
    from pyarrow import fs

    filesystem, root = _fs(uri)
    info = filesystem.get_file_info(root)
    if info.type == fs.FileType.NotFound:
        return 0
    n = 0
    for f in filesystem.get_file_info(fs.FileSelector(root, recursive=True)):
        if f.type != fs.FileType.File:
            continue
        rel = os.path.relpath(f.path, root)
        dest = local / rel
        if dest.exists() and dest.stat().st_size == f.size and dest.stat().st_mtime >= f.mtime.timestamp():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_stream(f.path) as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        n += 1
    return n


def push(local: Path, uri: str) -> int:
    """Copy the local files that are new or changed to the remote run directory; returns files copied."""
    from pyarrow import fs

    filesystem, root = _fs(uri)
    remote = {}
    if filesystem.get_file_info(root).type != fs.FileType.NotFound:
        remote = {os.path.relpath(f.path, root): f for f in filesystem.get_file_info(fs.FileSelector(root, recursive=True))
                  if f.type == fs.FileType.File}
    n = 0
    for dirpath, dirnames, filenames in os.walk(local):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            p = Path(dirpath) / name
            rel = os.path.relpath(p, local)
            st = p.stat()
            r = remote.get(rel)
            if r is not None and r.size == st.st_size and r.mtime.timestamp() >= st.st_mtime:
                continue
            dest = f"{root.rstrip('/')}/{rel}"
            filesystem.create_dir(os.path.dirname(dest), recursive=True)
            with open(p, "rb") as src, filesystem.open_output_stream(dest) as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            n += 1
    return n
