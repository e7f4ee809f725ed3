"""Small file helpers shared by the stages."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def replace_folder(new: Path, dest: Path) -> None:
    """Put a fully written folder in place of dest with renames only (readers never see half of one)."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
