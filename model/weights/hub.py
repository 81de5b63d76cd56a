"""Model folders from the Hugging Face Hub: ``download_hf_model("Qwen/Qwen3-0.6B")``.

A repo id (``owner/name``, or GPT-2's legacy ``gpt2``…``gpt2-xl``) becomes a folder in the
cache dir (default ``…/scratchgpt/hf/<repo>``) that ``--hf-dir`` would take: config.json, the
weights (``model.safetensors``, or ``model.safetensors.index.json`` and the shards it names)
and, for Llama 3 / Qwen3, the tokenizer files. Files come from
``$SCRATCHGPT_HF_ENDPOINT`` (else ``$HF_ENDPOINT``, else https://huggingface.co)
``/<repo>/resolve/main/<file>`` with a progress bar; ``$HF_TOKEN`` is sent as a bearer token
(gated repos such as Meta's Llama need one).

Each file is streamed into a hidden ``.<file>.incomplete`` beside it, checked (size, a
safetensors header, valid JSON) and only then renamed; an interrupted download is resumed
from where it stopped (HTTP Range) by the next call. config.json is renamed last, so a folder
that has it is complete: a second call makes no request.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
from pathlib import Path

import safetensors

from model.data.datadir import user_cache_dir
from model.data.files import commit, download

ENDPOINT_ENV = "SCRATCHGPT_HF_ENDPOINT"
TOKEN_ENV = "HF_TOKEN"
SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen3")
DECODER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what model.decoder's tokenizer reads
OPTIONAL_FILES = ("generation_config.json",)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class HFDownloadError(RuntimeError):
    """A Hugging Face file could not be downloaded; the message says how to use a local copy."""


def check_repo_id(repo: str) -> str:
    """``repo`` if it is a Hub repo id (``owner/name`` or a legacy name like ``gpt2``), else ValueError."""
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        raise ValueError(f"{repo!r} is not a Hugging Face repo id: expected OWNER/NAME such as Qwen/Qwen3-0.6B "
                         "or meta-llama/Llama-3.2-1B (or gpt2, gpt2-medium, gpt2-large, gpt2-xl)")
    return repo


def hf_endpoint() -> str:
    return (os.environ.get(ENDPOINT_ENV) or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def download_hf_model(repo: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of Hub repo ``repo`` in ``cache_dir`` (default: the user cache dir's ``hf/``),
    downloading what it lacks. Raises `HFDownloadError` with one line saying what to do
    (offline: the ``--hf-dir`` alternative; gated: the license and HF_TOKEN)."""
    target = (Path(cache_dir) if cache_dir is not None else user_cache_dir() / "hf") / check_repo_id(repo)
    target.mkdir(parents=True, exist_ok=True)
    config_path = target / "config.json"
    complete = config_path.is_file()
    pending_config = config_path if complete else _fetch(repo, "config.json", target, final=False)
    try:
        model_type = json.loads(pending_config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as err:
        pending_config.unlink()
        raise HFDownloadError(f"{repo}'s config.json is not a JSON object ({err}); run again to download it anew") \
            from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        if not complete:
            pending_config.unlink()
        raise HFDownloadError(f"{repo} is a {model_type!r} model; --hf-model takes {', '.join(SUPPORTED_MODEL_TYPES)}"
                              " repos (GPT-2, Llama 3, Qwen3)")
    if model_type != "gpt2":
        for name in DECODER_FILES:
            _fetch_missing(repo, name, target)
        for name in OPTIONAL_FILES:
            if not complete:  # a complete folder lacking it: the repo has none
                _fetch_missing(repo, name, target, optional=True)
    for name in _weight_files(repo, target):
        _fetch_missing(repo, name, target)
    if not complete:
        commit(pending_config, config_path)
    return target


def _weight_files(repo: str, target: Path) -> list[str]:
    """The safetensors files: model.safetensors, else the shards of the index (fetched if needed)."""
    index = target / "model.safetensors.index.json"
    if not index.is_file():
        if (target / "model.safetensors").is_file() or _fetch_missing(repo, "model.safetensors", target,
                                                                       optional=True):
            return []
        _fetch_missing(repo, index.name, target)
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        index.unlink()
        raise HFDownloadError(f"{repo}'s {index.name} has no weight_map ({err}); run again to download it anew") \
            from None
    bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s]
    if bad:
        raise HFDownloadError(f"{repo}'s {index.name} names shards that are not plain file names: {bad[:3]}")
    return shards


def _fetch_missing(repo: str, name: str, target: Path, optional: bool = False) -> bool:
    """Download ``name`` unless it is there; whether the folder has it now (False: optional and absent)."""
    if (target / name).is_file():
        return True
    return _fetch(repo, name, target, optional=optional) is not None


def _fetch(repo: str, name: str, target: Path, final: bool = True, optional: bool = False) -> Path | None:
    """Download ``name`` into ``target`` through its hidden partial file, checked; returns the
    file (the partial one when not ``final``), None when ``optional`` and the repo has none."""
    url = f"{hf_endpoint()}/{repo}/resolve/main/{name}"
    partial = target / f".{name}.incomplete"
    try:
        total = download(url, partial, f"{repo}/{name}", token=os.environ.get(TOKEN_ENV) or None, resume=True)
    except urllib.error.HTTPError as err:
        if err.code == 404 and optional:
            return None
        raise HFDownloadError(_refused(repo, url, err.code)) from None
    except (OSError, urllib.error.URLError) as err:  # URLError is an OSError; named for the reader
        raise HFDownloadError(
            f"could not download {url} ({err}). Offline? Download the files of https://huggingface.co/{repo} "
            f"on another machine, put them in a folder and pass --hf-dir DIR instead of --hf-model {repo}"
        ) from err
    if total is not None and partial.stat().st_size < total:  # the connection ended early: keep it to resume
        raise HFDownloadError(f"{url}: got {partial.stat().st_size} of {total} bytes; run again to resume")
    problem = _check(partial, total)
    if problem:
        partial.unlink()
        raise HFDownloadError(f"{url}: {problem}; run again to download it anew")
    if not final:
        return partial
    commit(partial, target / name)
    return target / name


def _check(path: Path, total: int | None) -> str | None:
    """What is wrong with a finished download (None: nothing we can see)."""
    if total is not None and path.stat().st_size != total:
        return f"got {path.stat().st_size} bytes, {total} announced"
    if path.name.endswith(".safetensors.incomplete"):
        try:
            with safetensors.safe_open(str(path), framework="np") as f:
                f.keys()
        except safetensors.SafetensorError as err:
            return f"not a valid safetensors file ({err})"
    elif path.name.endswith(".json.incomplete"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            return f"not valid JSON ({err})"
    return None


def _refused(repo: str, url: str, code: int) -> str:
    """The one line for an HTTP error status."""
    if code in (401, 403):
        sent = ("the HF_TOKEN sent was refused" if os.environ.get(TOKEN_ENV)
                else "no HF_TOKEN was set")
        return (f"{url}: HTTP {code}, {sent}: {repo} is gated or private (Llama is gated). Accept its license on "
                f"https://huggingface.co/{repo}, set HF_TOKEN to a token of yours "
                "(https://huggingface.co/settings/tokens), or download the folder and pass --hf-dir DIR")
    if code == 404:
        return f"{url}: HTTP 404: no such repo or file; check the repo id (e.g. Qwen/Qwen3-0.6B)"
    return f"{url}: HTTP {code}; try again later, or download the folder and pass --hf-dir DIR"
