"""Writing files so that nothing is ever left half-written, and streaming downloads.

Every file the project writes for later reading (checkpoints, LoRA adapters, responses
and scores, downloaded data and weights) goes through `atomic_write`: the bytes land in a
temp file (in a temp directory beside the destination), are flushed to disk, and only then
renamed over it (``os.replace`` is atomic on POSIX); the directory is flushed so the rename
lasts. A failure anywhere, including a check that raises inside ``write``, removes the temp directory
and leaves any old file untouched. A process killed mid-write (kill -9, OOM) cannot clean up:
its temp directory is removed by the next write to the same destination (one writer per
destination is assumed). Files get the usual permissions (0666 less the umask).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm


def atomic_write(dest: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``dest``, fsync it, then rename it to ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(dest)
    # NOTE: the temp file sits in a private temp directory, because some writers make temp
    # files of their own beside their target (safetensors writes ``.tmpXXXXXX`` and renames
    # it): a kill leaves those inside our directory, which the next write removes.
    tmp_dir = dest.parent / f".{dest.name}.{secrets.token_hex(8)}.tmp"
    tmp_dir.mkdir()
    tmp = tmp_dir / dest.name
    try:
        # os.open with mode 0o666 applies the umask (tempfile.mkstemp would make it 0600); the
        # mode is set again after ``write``, since a writer may replace the file (safetensors: 0600).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        commit(tmp, dest)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return dest


def commit(tmp: Path, dest: Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``dest`` (in the same directory tree), durably."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)


def _remove_stale_temp_files(dest: Path) -> None:
    """Delete what killed writes to ``dest`` left behind."""
    # Ours end in 16 hex digits; 8 characters of [a-z0-9_] are tempfile.mkstemp's, used before.
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.([0-9a-f]{{16}}|[a-z0-9_]{{8}})\.tmp")
    for name in os.listdir(dest.parent):
        if pattern.fullmatch(name):
            stale = dest.parent / name
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented UTF-8 JSON, written atomically."""
    text = json.dumps(obj, indent=4, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def download(url: str, dest: Path, desc: str, token: str | None = None, resume: bool = False) -> int | None:
    """Stream ``url`` into ``dest`` with a progress bar; returns the file's whole size as the
    server announced it (None when it sent none) so the caller can check the size.

    ``token`` goes as a bearer token to ``url``'s host only: not along a redirect (a hub
    redirects large files to a CDN with signed URLs). ``resume``: ``dest`` holds the start of
    the file from an interrupted download; ask for the rest (HTTP Range) and append, or start
    over when the server sends the whole file."""
    offset = dest.stat().st_size if resume and dest.exists() else 0
    request = urllib.request.Request(url)
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if offset and err.code == 416:  # the partial file is already whole (or longer): start over
            dest.unlink()
            return download(url, dest, desc, token)
        raise
    with response:
        appending = offset and response.status == 206
        if appending and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise OSError(f"{url}: asked for bytes from {offset}, got {response.headers.get('Content-Range')}")
        start = offset if appending else 0
        length = int(response.headers.get("Content-Length") or 0) or None
        with open(dest, "ab" if appending else "wb") as out, \
                tqdm(total=None if length is None else start + length, initial=start, unit="B", unit_scale=True,
                     unit_divisor=1024, desc=desc) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    return None if length is None else start + length
