"""Scoring responses to instructions against their reference outputs.

Three overlap metrics run anywhere, on normalised text (lowercase, punctuation removed,
whitespace collapsed):

* exact match: 1 when the normalised strings are equal;
* token F1: SQuAD-style bag-of-words F1 (articles are kept, unlike SQuAD's normaliser);
* ROUGE-L: F-measure of the longest common token subsequence (precision LCS/|response|,
  recall LCS/|reference|).

The LLM judge scores each response 0-100 with the book's prompt (chapter 7.8), through a
local Ollama server's REST API (``POST /api/chat``, streamed JSON lines). The server is
probed first; when none answers the judge is skipped with a message saying how to start
one. Replies that hold no usable score are counted and listed, not dropped.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import unicodedata
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from model.data.files import write_json_atomic
from model.data.instructions import format_input, read_json_entries

DEFAULT_OLLAMA_URL = "http://localhost:11434"
DEFAULT_JUDGE_MODEL = "llama3"
RESPONSE_FIELDS = ("instruction", "output", "model_response")


# --- overlap metrics ---
def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation (ASCII and Unicode), collapse whitespace."""
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text.lower()
        if ch not in string.punctuation and not unicodedata.category(ch).startswith("P")
    )
    return " ".join(text.split())


def exact_match(response: str, reference: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize_text(response) == normalize_text(reference))


def token_f1(response: str, reference: str) -> float:
    """Bag-of-words F1 of the normalised tokens (SQuAD's): 1.0 when both are empty."""
    pred, ref = normalize_text(response).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of `a` and `b` (dynamic programming, two rows)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(response: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) on normalised tokens: 1.0 when both are empty."""
    pred, ref = normalize_text(response).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


OVERLAP_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}
_LABELS = {"exact_match": "exact match", "token_f1": "token F1", "rouge_l": "ROUGE-L F"}


def score_overlap(entries: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """Per entry: each of `OVERLAP_METRICS` for ``model_response`` against ``output``."""
    return [{name: fn(e["model_response"], e["output"]) for name, fn in OVERLAP_METRICS.items()} for e in entries]


# --- LLM as judge (Ollama) ---
class JudgeError(RuntimeError):
    """The Ollama server answered, but with an error (e.g. the model is not pulled)."""


def judge_prompt(entry: dict[str, Any]) -> str:
    """The book's scoring prompt for one entry."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry['model_response']}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/api/chat")] if url.endswith("/api/chat") else url


def ollama_reachable(url: str = DEFAULT_OLLAMA_URL, timeout: float = 2.0) -> bool:
    """Whether an HTTP server answers at `url` (any status counts) within `timeout` seconds."""
    try:
        with urllib.request.urlopen(_base_url(url) + "/", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if not with 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def unreachable_message(url: str, model: str) -> str:
    return (f"no Ollama server reachable at {_base_url(url)} — skipping LLM-as-judge; start one with "
            f"`ollama serve` and pull the model (`ollama pull {model}`)")


def query_ollama(prompt: str, model: str = DEFAULT_JUDGE_MODEL, url: str = DEFAULT_OLLAMA_URL,
                 timeout: float = 300.0) -> str:
    """The reply of `model` to one user message, via Ollama's streamed ``/api/chat``
    (deterministic: seed 123, temperature 0, context 2048, as the book)."""
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }
    request = urllib.request.Request(
        _base_url(url) + "/api/chat", data=json.dumps(payload).encode("utf-8"), method="POST",
        headers={"Content-Type": "application/json"},
    )
    reply = []
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    raise JudgeError(f"Ollama sent a line that is not JSON: {line[:200]!r}") from None
                if "error" in message:
                    raise JudgeError(f"Ollama: {message['error']}")
                reply.append((message.get("message") or {}).get("content", ""))
                if message.get("done"):
                    break
    except urllib.error.HTTPError as err:
        body = err.read().decode("utf-8", "replace")
        try:
            body = json.loads(body).get("error", body)
        except (json.JSONDecodeError, AttributeError):
            pass
        raise JudgeError(f"Ollama at {_base_url(url)} answered HTTP {err.code}: {body} "
                         f"(is the model pulled? `ollama pull {model}`)") from None
    return "".join(reply)


def parse_score(reply: str) -> int | None:
    """The 0-100 integer score in a judge reply, or None when there is not exactly one.

    Accepts the bare number the prompt asks for and the usual wrappers ("Score: 85",
    "85/100", "85."); anything with no number, several numbers, a fraction, or a value
    outside 0-100 is unparseable."""
    text = re.sub(r"\s*/\s*100\b", "", reply.strip())
    numbers = re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])", text)
    if len(numbers) != 1:
        return None
    value = float(numbers[0])
    if not value.is_integer() or not 0 <= value <= 100:
        return None
    return int(value)


@dataclass
class JudgeResult:
    model: str
    scores: list[int | None] = field(default_factory=list)  # per entry; None: reply unparseable
    replies: list[str] = field(default_factory=list)

    @property
    def unparseable(self) -> list[int]:
        """Indices of the entries whose reply held no usable score."""
        return [i for i, s in enumerate(self.scores) if s is None]


def judge_responses(entries: Sequence[dict[str, Any]], model: str = DEFAULT_JUDGE_MODEL,
                    url: str = DEFAULT_OLLAMA_URL, timeout: float = 300.0, progress: bool = True) -> JudgeResult:
    """Ask the judge to score every entry; raises `JudgeError` on a server error."""
    result = JudgeResult(model)
    for entry in tqdm(entries, desc=f"judging ({model})", unit="entry", disable=not progress):
        reply = query_ollama(judge_prompt(entry), model, url, timeout)
        result.replies.append(reply)
        result.scores.append(parse_score(reply))
    return result


# --- summary ---
def summarize(overlap: Sequence[dict[str, float]], judge: JudgeResult | None = None) -> dict[str, Any]:
    """Mean and count of each metric (the judge's mean over its parsed scores)."""
    summary: dict[str, Any] = {}
    for name in OVERLAP_METRICS:
        values = [row[name] for row in overlap]
        summary[name] = {"mean": sum(values) / len(values) if values else float("nan"), "count": len(values)}
    if judge is not None:
        parsed = [s for s in judge.scores if s is not None]
        summary["judge"] = {"model": judge.model, "mean": sum(parsed) / len(parsed) if parsed else float("nan"),
                            "count": len(parsed), "unparseable": len(judge.unparseable)}
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The summary as an aligned text table."""
    rows = [("metric", "mean", "count")]
    for name, label in _LABELS.items():
        if name in summary:
            rows.append((label, f"{summary[name]['mean']:.4f}", str(summary[name]["count"])))
    if "judge" in summary:
        j = summary["judge"]
        note = f" ({j['unparseable']} unparseable)" if j["unparseable"] else ""
        rows.append((f"LLM judge, {j['model']} (0-100)", f"{j['mean']:.2f}", f"{j['count']}{note}"))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}" for r in rows)


def score_entries(entries: Sequence[dict[str, Any]], judge: bool = False, judge_model: str = DEFAULT_JUDGE_MODEL,
                  ollama_url: str = DEFAULT_OLLAMA_URL, judge_timeout: float = 300.0, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score `entries` (overlap metrics, and the judge when asked and reachable); log the
    table and any unparseable judge replies. Returns ``{"summary", "entries"}`` where each
    entry is the input entry plus a ``scores`` dict."""
    overlap = score_overlap(entries)
    result = None
    if judge:
        if ollama_reachable(ollama_url):
            result = judge_responses(entries, judge_model, ollama_url, judge_timeout, progress)
        else:
            log(unreachable_message(ollama_url, judge_model))
    scored = []
    for i, (entry, scores) in enumerate(zip(entries, overlap)):
        scores = dict(scores)
        if result is not None:
            scores["judge_score"] = result.scores[i]
            scores["judge_reply"] = result.replies[i]
        scored.append({**entry, "scores": scores})
    summary = summarize(overlap, result)
    log(format_table(summary))
    if result is not None and result.unparseable:
        log(f"{len(result.unparseable)} judge repl{'y' if len(result.unparseable) == 1 else 'ies'} held no "
            "0-100 score (left out of the mean):")
        for i in result.unparseable[:10]:
            log(f"  entry {i}: {result.replies[i][:120]!r}")
    return {"summary": summary, "entries": scored}


def score_file(path: str | Path, out: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """`score_entries` on a responses JSON file; writes the scores JSON to `out` if given."""
    entries = read_json_entries(path, required=RESPONSE_FIELDS)
    scored = score_entries(entries, **kwargs)
    if out is not None:
        write_json_atomic(out, scored)
    return scored


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """The LLM-as-judge flags (shared with ``model.instruct``)."""
    parser.add_argument("--judge", action="store_true",
                        help="also score each response 0-100 with an LLM through a local Ollama server")
    parser.add_argument("--judge-model", default=DEFAULT_JUDGE_MODEL, help="Ollama model that judges")
    parser.add_argument("--ollama-url", default=DEFAULT_OLLAMA_URL, help="base URL of the Ollama server")
    parser.add_argument("--judge-timeout", type=float, default=300.0, help="seconds to wait for one judge reply")
