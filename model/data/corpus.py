"""Tokenizing a text corpus once into memory-mappable token files (nanoGPT's ``prepare.py``).

`prepare_corpus(inputs, out_dir)` takes a text file, a directory (its ``*.txt`` files,
recursively) or a glob; each file is one document, encoded whole with the GPT-2 tokenizer
by a pool of worker processes. Documents go to ``train.bin`` or ``val.bin`` (uint16 ids,
``<|endoftext|>`` after each document), chosen by a hash of the document's path so the
split is deterministic and does not move when files are added; a corpus of one document
is split inside it instead (its last `val_fraction` of tokens is validation, as the
book's 90/10 split). ``meta.json`` holds the counts, the tokenizer's name and a
fingerprint of the input (names, sizes, modification times, settings): re-running on an
unchanged input does nothing. Memory stays flat: one document per worker is in memory,
at most ``2 x workers`` finished documents wait to be written, and the files are
streamed to disk.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from model.data.files import atomic_write, write_json_atomic
from model.tokenizers.bpe import ENDOFTEXT
from model.tokenizers.gpt2 import encode_text, gpt2_tokenizer

TOKENIZER_NAME = "gpt2"
TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit
META_FILE = "meta.json"
FORMAT_VERSION = 1


class CorpusError(ValueError):
    """The input names no documents, or the output is unusable; the message says what to do."""


@dataclass(frozen=True)
class Document:
    path: Path
    name: str  # path relative to the input root: the key of the split
    size: int
    mtime_ns: int


def find_documents(inputs: str | os.PathLike) -> list[Document]:
    """The documents of `inputs`, sorted by name: a file, a directory's ``*.txt`` files
    (recursively), or the files a glob matches."""
    path = Path(inputs).expanduser()
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = sorted(p for p in path.rglob("*.txt") if p.is_file()), path
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else path.parent
    if not files:
        what = "directory holds no .txt file" if path.is_dir() else "is neither a file, a directory nor a matching glob"
        raise CorpusError(f"{inputs}: the {what}; give a text file, a directory of .txt files or a glob like "
                          "'books/*.txt'")
    docs = []
    for f in files:
        stat = f.stat()
        docs.append(Document(f, f.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(docs, key=lambda d: d.name)


def _unit_hash(name: str) -> float:
    """A document name as a number in [0, 1): the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def validation_flags(docs: list[Document], val_fraction: float) -> list[bool]:
    """Which documents are for validation: those whose name hashes below `val_fraction`, so
    adding files never moves another one; with two or more documents and a fraction above 0,
    at least one goes to each split (the lowest / highest hash)."""
    hashes = [_unit_hash(d.name) for d in docs]
    flags = [h < val_fraction for h in hashes]
    if len(docs) > 1 and val_fraction > 0:
        if not any(flags):
            flags[hashes.index(min(hashes))] = True
        if all(flags):
            flags[hashes.index(max(hashes))] = False
    return flags


def fingerprint(docs: list[Document], val_fraction: float) -> str:
    """What the output depends on: the documents' names, sizes and modification times, and the settings."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, TOKENIZER_NAME, val_fraction]).encode())
    for d in docs:
        h.update(f"{d.name}\0{d.size}\0{d.mtime_ns}\n".encode())
    return h.hexdigest()


def read_meta(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``meta.json`` of a prepared directory, or None when there is none."""
    path = Path(out_dir) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --- encoding in worker processes ---
_worker_tokenizer: Any = None


def _init_worker(data_dir: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = gpt2_tokenizer(data_dir)


def _encode_document(path: Path) -> np.ndarray:
    """One document's ids followed by ``<|endoftext|>``, as uint16."""
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = encode_text(_worker_tokenizer, text)
    ids.append(_worker_tokenizer.eot_token)
    return np.asarray(ids, dtype=TOKEN_DTYPE)


def _encoded_in_order(paths: list[Path], workers: int, data_dir: str | None) -> Iterator[np.ndarray]:
    """Each path's ids, in order, encoded by `workers` processes (in this one when 1) with at
    most 2 x workers results waiting, so memory does not grow with the corpus."""
    if workers <= 1:
        _init_worker(data_dir)
        yield from map(_encode_document, paths)
        return
    # NOTE: spawn, not fork: the parent may hold threads (tqdm's monitor, torch) that fork copies badly.
    with get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(data_dir,)) as pool:
        pending: deque = deque()
        for path in paths:
            pending.append(pool.apply_async(_encode_document, (path,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare_corpus(inputs: str | os.PathLike, out_dir: str | os.PathLike, *, val_fraction: float = 0.1,
                   workers: int | None = None, data_dir: str | None = None, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenize `inputs` into ``train.bin``, ``val.bin`` and ``meta.json`` in `out_dir` (see the
    module docstring); returns the metadata. Nothing is done when `out_dir` already holds the
    output of the same input and settings."""
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    docs = find_documents(inputs)
    out = Path(out_dir)
    key = fingerprint(docs, val_fraction)
    meta = read_meta(out)
    if meta is not None and meta.get("fingerprint") == key and _bins_match(out, meta):
        log(f"{out}: up to date ({meta['documents']} documents, {meta['train_tokens']:,} + {meta['val_tokens']:,} "
            "tokens); nothing to do")
        return meta
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # written last: its absence marks an unfinished output
    workers = workers or os.cpu_count() or 1
    one_document = len(docs) == 1
    counts = {"train": 0, "val": 0}
    to_val = validation_flags(docs, val_fraction)
    val_docs = 0 if one_document else sum(to_val)

    def write_both(train_tmp: Path, val_tmp: Path) -> None:
        total = sum(d.size for d in docs)
        with open(train_tmp, "wb") as train_f, open(val_tmp, "wb") as val_f, \
                tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
            encoded = _encoded_in_order([d.path for d in docs], min(workers, len(docs)), data_dir)
            for doc, is_val, ids in zip(docs, to_val, encoded):
                if one_document:
                    # NOTE: the end-of-text token stays with the validation part, which ends the document.
                    split = len(ids) - max(round(val_fraction * len(ids)), 1 if val_fraction > 0 else 0)
                    parts = (("train", train_f, ids[:split]), ("val", val_f, ids[split:]))
                elif is_val:
                    parts = (("val", val_f, ids),)
                else:
                    parts = (("train", train_f, ids),)
                for split_name, f, part in parts:
                    f.write(part.tobytes())
                    counts[split_name] += len(part)
                bar.update(doc.size)

    atomic_write(out / "train.bin", lambda train_tmp: atomic_write(
        out / "val.bin", lambda val_tmp: write_both(train_tmp, val_tmp)))
    meta = {"tokenizer": TOKENIZER_NAME, "dtype": np.dtype(TOKEN_DTYPE).name, "eot_token": _eot_token(data_dir),
            "documents": len(docs), "val_documents": val_docs, "train_tokens": counts["train"],
            "val_tokens": counts["val"], "val_fraction": val_fraction, "input": str(inputs), "fingerprint": key,
            "format_version": FORMAT_VERSION}
    write_json_atomic(out / META_FILE, meta)
    log(f"{out}: {len(docs)} documents ({val_docs} for validation) -> {counts['train']:,} training and "
        f"{counts['val']:,} validation tokens")
    return meta


def _eot_token(data_dir: str | None) -> int:
    return gpt2_tokenizer(data_dir).encode(ENDOFTEXT, allowed_special={ENDOFTEXT})[0]


def _bins_match(out: Path, meta: dict[str, Any]) -> bool:
    """The token files are there with the sizes `meta` counts."""
    size = np.dtype(meta.get("dtype", "uint16")).itemsize
    return all((out / f"{split}.bin").is_file() and (out / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"]
               * size for split in ("train", "val"))
