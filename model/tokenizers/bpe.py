"""Byte-level byte-pair encoding (BPE), from scratch: training, GPT-2's files, encoding.

Text is first cut into chunks by GPT-2's pre-tokenization regex (words with their
leading space, numbers, punctuation runs, whitespace), so merges never cross a word
boundary. Each chunk's UTF-8 bytes start as one token per byte; merges glue adjacent
tokens together. A token is identified by its bytes, and its *rank* (= its id) says
when it was made: bytes are 0..255-ish, each merge adds the next rank.

NOTE (the merge rule): to encode a chunk we repeatedly merge the adjacent pair whose
concatenation is the lowest-ranked token, leftmost first, and a chunk that is itself a
token is that token. This is tiktoken's rule. GPT-2's original encoder instead ranks
the *pair* (merge line order); the two agree on GPT-2's vocabulary, and training below
keeps every chunk's segmentation equal to what this rule gives, so `to_tiktoken()`
encodes exactly as `encode()` by construction.
"""

from __future__ import annotations

import heapq
import json
import os
import warnings
from collections import Counter
from collections.abc import Collection, Iterable, Iterator

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

try:
    import regex as _re

    _PATTERN = _re.compile(GPT2_PATTERN)
except ImportError:  # NOTE: approximate: `re` has no \p{L}/\p{N}; letters and digits via \w classes
    import re as _re

    _PATTERN = _re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")

ENDOFTEXT = "<|endoftext|>"
_NO_RANK = 1 << 62  # larger than any rank: "this pair is not a token"
_CACHE_LIMIT = 100_000  # chunks remembered per tokenizer


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (how encoder.json spells bytes).

    Printable Latin-1 bytes map to themselves; the other 68 (control chars, space, ...)
    map to 256, 257, ... in byte order, so a space becomes 'Ġ' and a newline 'Ċ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + n)
    return mapping


def _merge_chunk(parts: list[bytes], ranks: dict[bytes, int]) -> list[bytes]:
    """Merge adjacent parts, lowest-ranked concatenation first (leftmost on ties), until none is a token."""
    pair_ranks = [ranks.get(a + b, _NO_RANK) for a, b in zip(parts, parts[1:])]
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NO_RANK:
            break
        i = pair_ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], _NO_RANK)
        if i < len(pair_ranks):
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], _NO_RANK)
    return parts


def _split_special(text: str, special: Collection[str]) -> Iterator[tuple[str, str | None]]:
    """Yield (ordinary text, special token or None) pieces of `text`, in order."""
    if not special:
        yield text, None
        return
    # Longest first, so a special token that is a prefix of another does not win.
    pattern = _re.compile("|".join(_re.escape(s) for s in sorted(special, key=len, reverse=True)))
    start = 0
    for match in pattern.finditer(text):
        yield text[start : match.start()], match.group()
        start = match.end()
    yield text[start:], None


class BytePairTokenizer:
    """A byte-level BPE tokenizer: `ranks` (token bytes -> id) plus special tokens (str -> id)."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int]):
        self._ranks = dict(ranks)
        self._special = dict(special_tokens)
        self._decoder = {i: b for b, i in self._ranks.items()}
        self._decoder.update({i: s.encode("utf-8") for s, i in self._special.items()})
        if len(self._decoder) != len(self._ranks) + len(self._special):
            raise ValueError("token ids are not unique")
        self._cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------- building

    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Iterable[str] = (ENDOFTEXT,)) -> BytePairTokenizer:
        """Learn merges from `text` until the vocabulary (256 bytes + merges + specials) has `vocab_size` tokens.

        Each step merges the most frequent adjacent pair, counted within pre-tokenized
        chunks; ties go to the lexicographically smallest (left bytes, right bytes).
        Special tokens in `text` are cut out first and get the last ids.
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size {vocab_size} is below the minimum {256 + len(special_tokens)} "
                f"(256 byte tokens + {len(special_tokens)} special tokens)"
            )
        ranks = {bytes([b]): b for b in range(256)}

        chunk_counts: Counter[str] = Counter()
        for piece, _ in _split_special(text, special_tokens):
            chunk_counts.update(_PATTERN.findall(piece))
        chunks = [c.encode("utf-8") for c in chunk_counts]
        freqs = list(chunk_counts.values())
        words = [[bytes([b]) for b in c] for c in chunks]  # current segmentation of each unique chunk
        chunk_index = {c: i for i, c in enumerate(chunks)}

        pair_counts: Counter[tuple[bytes, bytes]] = Counter()
        where: dict[tuple[bytes, bytes], set[int]] = {}  # pair -> chunks that have (or had) it
        for i, parts in enumerate(words):
            for pair in zip(parts, parts[1:]):
                pair_counts[pair] += freqs[i]
                where.setdefault(pair, set()).add(i)
        heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
        heapq.heapify(heap)

        for _ in range(n_merges):
            while heap and pair_counts.get((heap[0][1], heap[0][2]), 0) != -heap[0][0]:
                heapq.heappop(heap)  # stale entry: that pair's count has changed since
            if not heap:
                warnings.warn(
                    f"text has no pairs left to merge after {len(ranks) - 256} merges; "
                    f"vocab_size is {len(ranks) + len(special_tokens)}, not {vocab_size}",
                    stacklevel=2,
                )
                break
            _, a, b = heapq.heappop(heap)
            new = a + b
            ranks[new] = len(ranks)
            affected = where.pop((a, b))
            if new in chunk_index:
                affected.add(chunk_index[new])
            for i in affected:
                old = words[i]
                # NOTE: re-merging the current segmentation with the grown vocabulary gives
                # the same result as encoding the chunk from scratch, because the new token
                # has the highest rank: it only merges once nothing else can.
                words[i] = [new] if chunks[i] == new else _merge_chunk(list(old), ranks)
                change = Counter(zip(words[i], words[i][1:]))
                change.subtract(zip(old, old[1:]))
                for pair, delta in change.items():
                    if delta == 0:
                        continue
                    count = pair_counts[pair] + delta * freqs[i]
                    if count:
                        pair_counts[pair] = count
                        heapq.heappush(heap, (-count, *pair))
                        where.setdefault(pair, set()).add(i)
                    else:
                        del pair_counts[pair]
        special = {s: len(ranks) + k for k, s in enumerate(special_tokens)}
        return cls(ranks, special)

    @classmethod
    def from_gpt2_files(
        cls, encoder_json_path: str | os.PathLike, vocab_bpe_path: str | os.PathLike
    ) -> BytePairTokenizer:
        """GPT-2's tokenizer from OpenAI's ``encoder.json`` (token -> id) and ``vocab.bpe`` (merges).

        Ranks come from the merge order: the 256 bytes in GPT-2's byte order, then one per
        line of vocab.bpe. They must equal the ids in encoder.json; whatever encoder.json
        holds beyond the merges (``<|endoftext|>``) is a special token.
        """
        byte_of = {ch: b for b, ch in gpt2_bytes_to_unicode().items()}

        def to_bytes(token: str) -> bytes:
            return bytes(byte_of[ch] for ch in token)

        ranks = {bytes([b]): i for i, b in enumerate(gpt2_bytes_to_unicode())}
        with open(vocab_bpe_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if not lines[0].startswith("#version"):
            raise ValueError(f"{vocab_bpe_path} does not look like a GPT-2 vocab.bpe (no '#version' header)")
        for line in filter(None, lines[1:]):
            left, right = line.split(" ")
            ranks[to_bytes(left) + to_bytes(right)] = len(ranks)

        with open(encoder_json_path, encoding="utf-8") as f:
            encoder: dict[str, int] = json.load(f)
        special = {}
        for token, token_id in encoder.items():
            token_bytes = to_bytes(token) if all(ch in byte_of for ch in token) else None
            if token_bytes in ranks:
                if ranks[token_bytes] != token_id:
                    raise ValueError(
                        f"{encoder_json_path} gives {token!r} id {token_id} but {vocab_bpe_path} ranks it "
                        f"{ranks[token_bytes]}: the two files do not belong together"
                    )
            elif token.startswith("<|") and token.endswith("|>"):
                special[token] = token_id
            else:
                raise ValueError(f"{encoder_json_path} has {token!r}, which no merge in {vocab_bpe_path} makes")
        if len(encoder) != len(ranks) + len(special):
            raise ValueError(f"{vocab_bpe_path} makes tokens that {encoder_json_path} lacks")
        return cls(ranks, special)

    # ---------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        return len(self._decoder)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token -> id."""
        return dict(self._special)

    @property
    def eot_token(self) -> int:
        """Id of ``<|endoftext|>``."""
        return self._special[ENDOFTEXT]

    def encode(self, text: str, allowed_special: Collection[str] | str = frozenset({ENDOFTEXT})) -> list[int]:
        """Token ids of `text`. This tokenizer's special tokens named in `allowed_special` (or
        all, with ``"all"``) become their ids; other special-token text is ordinary text."""
        allowed = self._special.keys() if allowed_special == "all" else self._special.keys() & set(allowed_special)
        ids: list[int] = []
        for piece, special in _split_special(text, allowed):
            ids += self.encode_ordinary(piece)
            if special is not None:
                ids.append(self._special[special])
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, treating special-token text as ordinary text."""
        ids: list[int] = []
        for chunk in _PATTERN.findall(text):
            chunk_ids = self._cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._encode_chunk(chunk.encode("utf-8"))
                if len(self._cache) < _CACHE_LIMIT:
                    self._cache[chunk] = chunk_ids
            ids += chunk_ids
        return ids

    def _encode_chunk(self, data: bytes) -> list[int]:
        if data in self._ranks:
            return [self._ranks[data]]
        return [self._ranks[part] for part in _merge_chunk([bytes([b]) for b in data], self._ranks)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: their bytes joined, decoded as UTF-8 (invalid sequences become U+FFFD)."""
        try:
            data = b"".join(self._decoder[int(i)] for i in ids)
        except KeyError as err:
            raise ValueError(f"token id {err.args[0]} is not in the vocabulary (size {self.vocab_size})") from None
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for."""
        return self._decoder[token_id]

    def to_tiktoken(self, name: str = "scratchgpt-bpe"):
        """The same tokenizer as a `tiktoken.Encoding` (fast, Rust): identical ids."""
        import tiktoken

        return tiktoken.Encoding(
            name=name,
            pat_str=GPT2_PATTERN,
            mergeable_ranks=dict(self._ranks),
            special_tokens=dict(self._special),
            explicit_n_vocab=self.vocab_size,
        )
