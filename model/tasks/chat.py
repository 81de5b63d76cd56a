"""A conversation with a language model: prompt formats and a session that keeps its KV cache.

A `ChatFormat` turns the messages so far (``{"role": "user" | "assistant" | "system",
"content": text}``) into the token ids the model continues, and names the tokens that end a
reply. Three kinds: the prompt template an instruction-tuned GPT learned (``alpaca``, the
book's chapter 7 format, stored by ``model.instruct`` in its checkpoint's metadata), a Llama 3
/ Qwen3 folder's native template (model.decoder), and plain continuation for a model that
learned no template.

`ChatSession.send` appends a user message and streams the reply. The KV cache carries
across turns: the conversation is re-encoded, and only the tokens after the part already in
the cache are fed (when an earlier part changed, the cache is rebuilt). When the
conversation plus room for a reply no longer fits the context, the oldest turns are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import engine
from model.data.instructions import RESPONSE_HEADER, format_input
from model.sampling import sample_next
from model.tokenizers.bpe import ENDOFTEXT

Message = dict[str, Any]


def render_alpaca(messages: list[Message], eos_text: str = ENDOFTEXT) -> str:
    """The book's instruction format, turn after turn: each user message is an instruction
    followed by the response header; each reply ends with the end-of-text token (GPT-2's
    <|endoftext|>, a Llama / Qwen3 folder's eos_token), as in training. A system message has
    no place in this format and is left out."""
    parts = []
    for m in messages:
        if m["role"] == "user":
            parts.append(f"{format_input({'instruction': m['content']})}\n\n{RESPONSE_HEADER}\n")
        elif m["role"] == "assistant":
            parts.append(m["content"] + eos_text)
    return "".join(parts)


# The templates a checkpoint may name in its metadata (``extra["prompt_template"]``).
PROMPT_TEMPLATES: dict[str, Callable[[list[Message], str], str]] = {"alpaca": render_alpaca}


@dataclass(frozen=True)
class ChatFormat:
    name: str  # "alpaca", "llama3", "qwen3", or "plain" (continuation: no template)
    encode: Callable[[list[Message]], list[int]]  # the conversation, ready for the next reply
    stop_ids: tuple[int, ...]  # a reply ends at the first of these

    @property
    def is_template(self) -> bool:
        return self.name != "plain"


def prompt_chat_format(template: str | None, encode_text: Callable[[str], list[int]], eos_id: int,
                       eos_text: str = ENDOFTEXT) -> ChatFormat:
    """The named prompt template, or plain continuation (None), for a tokenizer whose
    end-of-text token is ``eos_text`` (id ``eos_id``)."""
    if template is None:
        return ChatFormat("plain", lambda messages: encode_text("".join(m["content"] for m in messages)), (eos_id,))
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}: this version knows {', '.join(PROMPT_TEMPLATES)}")
    render = PROMPT_TEMPLATES[template]
    return ChatFormat(template, lambda messages: encode_text(render(messages, eos_text)), (eos_id,))


@dataclass
class Reply:
    text: str
    tokens: int  # tokens generated (the stop token not counted)
    seconds: float  # prompt processing and generation
    dropped_turns: int  # oldest turns left out to fit the context

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class ChatSession:
    model: Any  # GPTModel or DecoderModel: model(ids, kv_cache=...), new_kv_cache(), config.context_length
    format: ChatFormat
    decode: Callable[[list[int]], str]
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    system: str | None = None  # a system message opening every conversation
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = self.model.new_kv_cache()
        self.cached: list[int] = []  # the token ids whose keys and values the cache holds

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """The model's reply to the user message ``text``; ``on_text`` receives it piece by
        piece as it is generated. Raises ValueError when the message alone overflows the context.
        Interrupted (Ctrl-C), the turn is not added to the conversation."""
        start = time.perf_counter()
        messages, ids, dropped = self._fit(self.messages + [{"role": "user", "content": text}])
        reply: list[int] = []
        shown = ""
        context = self.model.config.context_length
        with self.model.evaluating(), engine.no_grad():
            logits = self._feed(ids)
            while len(reply) < self.max_new_tokens:
                token = int(sample_next(logits, self.temperature, self.top_k, self.top_p, self.rng)[0])
                if token in self.format.stop_ids:
                    break
                reply.append(token)
                piece = self.decode(reply)
                if on_text is not None and not piece.endswith("\ufffd"):  # wait for a character's last byte
                    on_text(piece[len(shown):])
                    shown = piece
                if len(self.cached) >= context:  # the context is full: the reply ends here
                    break
                logits = self._feed(ids + reply)
        text_out = self.decode(reply)
        if on_text is not None and len(text_out) > len(shown):
            on_text(text_out[len(shown):])
        self.messages = messages + [{"role": "assistant", "content": text_out}]
        return Reply(text_out, len(reply), time.perf_counter() - start, dropped)

    def _fit(self, messages: list[Message]) -> tuple[list[Message], list[int], int]:
        """The conversation that fits the context with room for a reply: the oldest turns go first."""
        context = self.model.config.context_length
        room = min(self.max_new_tokens, context // 2)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        dropped = 0
        ids = self.format.encode(messages)
        while len(ids) + room > context and len(messages) - first > 1:
            # a turn is the oldest user message and the reply to it
            end = first + 1 + (messages[first + 1]["role"] == "assistant")
            messages = messages[:first] + messages[end:]
            dropped += 1
            ids = self.format.encode(messages)
        if len(ids) >= context:
            raise ValueError(f"the message makes a prompt of {len(ids)} tokens, and this model's context holds "
                             f"{context}: write a shorter one")
        return messages, ids, dropped

    def _feed(self, ids: list[int]) -> np.ndarray:
        """Last-position logits (1, vocab) after ``ids``, feeding only what the cache lacks."""
        if self.cached != ids[:len(self.cached)] or len(self.cached) == len(ids):
            self.cache = self.model.new_kv_cache()  # an earlier part changed: rebuild
            self.cached = []
        new = ids[len(self.cached):]
        logits = self.model(np.asarray([new], dtype=np.int64), kv_cache=self.cache)  # (1, T, vocab)
        self.cached = list(ids)
        return logits[:, -1].numpy()  # (1, vocab)
