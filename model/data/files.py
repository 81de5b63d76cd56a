"""Writing files so that nothing is ever left half-written, and streaming downloads.

Every file the project writes for later reading (checkpoints, LoRA adapters, responses
and scores, downloaded data and weights) goes through `atomic_write`: the bytes land in a
temp file beside the destination, are flushed to disk, and only then renamed over it
(``os.replace`` is atomic on POSIX). A failure anywhere, including a check that raises
inside ``write``, removes the temp file and leaves any old file untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm


def atomic_write(dest: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``dest``, fsync it, then rename it to ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented UTF-8 JSON, written atomically."""
    text = json.dumps(obj, indent=4, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def download(url: str, dest: Path, desc: str) -> int | None:
    """Stream ``url`` into ``dest`` with a progress bar; returns the announced Content-Length
    (None when the server sent none) so the caller can check the size."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    return total
