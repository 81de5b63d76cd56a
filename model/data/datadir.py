"""Where data files live, and fetching them when they are missing.

The data directory is, in order: the ``--data-dir`` flag, the ``SCRATCHGPT_DATA_DIR``
environment variable, the user cache dir (``$XDG_CACHE_HOME/scratchgpt``, by default
``~/.cache/scratchgpt``). ``data_file("gpt2/vocab.bpe")`` returns the file from there;
a known file that is missing is downloaded from its canonical public URL with a progress
bar, checked against its pinned SHA-256 and size, and moved into place atomically.
Offline (or for an unknown file) it raises `DataFileNotFoundError`, which says where it
looked and how to point the code at a copy.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from model.data import files

DATA_DIR_ENV = "SCRATCHGPT_DATA_DIR"


@dataclass(frozen=True)
class DataSource:
    url: str
    sha256: str  # of the file as stored (for a zip: of the extracted member)
    size: int  # bytes, as stored
    member: str | None = None  # name inside the zip archive at `url`, if it is one


_BOOK = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"

# Checksums and sizes: see the data README (shared/data/README.md).
DATA_FILES: dict[str, DataSource] = {
    "the-verdict.txt": DataSource(
        f"{_BOOK}/ch02/01_main-chapter-code/the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        20479,
    ),
    "gpt2/encoder.json": DataSource(
        f"{_GPT2}/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        1042301,
    ),
    "gpt2/vocab.bpe": DataSource(
        f"{_GPT2}/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        456318,
    ),
    "instruction-data.json": DataSource(
        f"{_BOOK}/ch07/01_main-chapter-code/instruction-data.json",
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
        203524,
    ),
    "sms_spam_collection/SMSSpamCollection.tsv": DataSource(
        "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
        "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
        477907,
        member="SMSSpamCollection",
    ),
    "tinyshakespeare/input.txt": DataSource(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        1115394,
    ),
}


class DataFileNotFoundError(FileNotFoundError):
    """A data file is neither on disk nor downloadable; the message says what to do."""


class DataChecksumError(RuntimeError):
    """A downloaded file is not the one we pinned (SHA-256 or size differ); it was removed."""


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/scratchgpt``, or ``~/.cache/scratchgpt``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "scratchgpt"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: `data_dir` if given, else ``$SCRATCHGPT_DATA_DIR``, else the user cache dir."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or user_cache_dir()
    return Path(data_dir).expanduser().resolve()


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    """Add the ``--data-dir`` flag every command shares."""
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help=(
            f"directory holding the data files (default: ${DATA_DIR_ENV} if set, else "
            f"{user_cache_dir()}); a missing file is downloaded into it when online"
        ),
    )


def data_file(relpath: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Path of data file `relpath` (e.g. ``"gpt2/vocab.bpe"``), downloading it if needed.

    Looks in the resolved data dir, then in the user cache dir (where a download lands
    when the data dir is not writable). A missing file that is in `DATA_FILES` is
    downloaded when `download` is true; otherwise, or when the download fails, raises
    `DataFileNotFoundError`. A download whose checksum is wrong raises `DataChecksumError`.
    """
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"data file path must be relative to the data dir, got {relpath!r}")
    searched = [resolve_data_dir(data_dir)]
    if user_cache_dir().resolve() != searched[0]:
        searched.append(user_cache_dir().resolve())
    for directory in searched:
        if (directory / rel).is_file():
            return directory / rel

    source = DATA_FILES.get(str(rel))
    if source is None:
        raise DataFileNotFoundError(_missing_message(relpath, searched, "it is not a file we know how to download."))
    if not download:
        raise DataFileNotFoundError(_missing_message(relpath, searched, "downloading was turned off.", source))
    target = next((d for d in searched if _writable(d)), None)
    if target is None:
        reason = f"none of these directories is writable, so it cannot be downloaded from {source.url}."
        raise DataFileNotFoundError(_missing_message(relpath, searched, reason, source))
    dest = target / rel
    try:
        _fetch(source, dest, desc=str(rel))
    except (OSError, http.client.HTTPException) as err:
        reason = f"downloading it from {source.url} failed ({err}); are we offline?"
        raise DataFileNotFoundError(_missing_message(relpath, searched, reason, source)) from err
    return dest


def _missing_message(relpath: str, searched: list[Path], reason: str, source: DataSource | None = None) -> str:
    places = "\n".join(f"  {d / relpath}" for d in searched)
    fix = (
        f"To fix: pass --data-dir DIR (or set the environment variable {DATA_DIR_ENV}=DIR) "
        f"pointing at a directory that contains {relpath}"
    )
    if source is not None:
        fix += f", or run once with network access so it is downloaded from {source.url}"
    return f"data file {relpath!r} not found; {reason}\nSearched:\n{places}\n{fix}."


def _writable(directory: Path) -> bool:
    # NOTE: os.access is not enough: it says yes to root on a read-only filesystem.
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _fetch(source: DataSource, dest: Path, desc: str) -> None:
    """Download `source` to `dest`, verified before it takes the final name."""

    def fetch_and_verify(tmp: Path) -> None:
        files.download(source.url, tmp, desc)
        if source.member is not None:
            try:
                with zipfile.ZipFile(tmp) as archive:
                    content = archive.read(source.member)
            except (zipfile.BadZipFile, KeyError) as err:
                raise DataChecksumError(
                    f"{source.url} is not a zip archive holding {source.member!r} ({err}); download removed"
                ) from err
            tmp.write_bytes(content)
        digest, size = _sha256(tmp), tmp.stat().st_size
        if digest != source.sha256 or size != source.size:
            raise DataChecksumError(
                f"download of {desc} from {source.url} does not match the pinned file: "
                f"sha256 {digest} ({size} bytes), expected {source.sha256} ({source.size} bytes). "
                "The bad download was removed; the file may have changed upstream."
            )

    files.atomic_write(dest, fetch_and_verify)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
