"""The Llama 3 and Qwen3 chat templates, written natively (no Jinja).

A conversation is a list of ``{"role": ..., "content": ...}`` dicts (roles system, user,
assistant). `ChatTemplate.render` gives the text the model was trained on, as the
published templates (``chat_template`` in tokenizer_config.json) render it without tools;
`ChatTemplate.encode` tokenizes it (the text carries its own BOS, so none is added).

Llama 3.2: ``<|begin_of_text|>``, then always a system header carrying the knowledge
cutoff and today's date (``date_string``, "%d %b %Y") before the optional system message;
every message's content is stripped; each turn ends with ``<|eot_id|>``.

Qwen3: ``<|im_start|>role\\ncontent<|im_end|>\\n`` turns. An assistant turn after the last
user message shows its reasoning as ``<think>\\n…\\n</think>\\n\\n`` before the answer (an
empty block for the final turn); earlier turns drop it. ``enable_thinking=False`` opens the
reply with an empty think block, which tells the model not to think.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Callable

from model.decoder.tokenizer import HFTokenizer

Message = dict[str, Any]


def _check_roles(messages: list[Message], allowed: tuple[str, ...]) -> None:
    if not messages:
        raise ValueError("chat template: the conversation has no messages")
    for i, m in enumerate(messages):
        if m.get("role") not in allowed or not isinstance(m.get("content"), str):
            raise ValueError(f"chat template: message {i} needs a role in {allowed} and a text content, got {m!r}")


def render_llama3(messages: list[Message], add_generation_prompt: bool = True, date_string: str | None = None) -> str:
    _check_roles(messages, ("system", "user", "assistant"))
    date_string = date_string or datetime.date.today().strftime("%d %b %Y")
    system = ""
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    parts = ["<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
             f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n{system}<|eot_id|>"]
    for m in messages:
        parts.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def render_qwen3(messages: list[Message], add_generation_prompt: bool = True, enable_thinking: bool = True) -> str:
    _check_roles(messages, ("system", "user", "assistant"))
    last_query = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    parts = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "user" or role == "system":
            parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
            continue
        reasoning = m.get("reasoning_content")
        if not isinstance(reasoning, str):
            reasoning = ""
            if "</think>" in content:
                head, _, content = content.partition("</think>")
                reasoning = head.rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        if i > last_query and (i == len(messages) - 1 or reasoning):
            parts.append(f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"
                         f"{content.lstrip(chr(10))}<|im_end|>\n")
        else:
            parts.append(f"<|im_start|>assistant\n{content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n"))
    return "".join(parts)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    render: Callable[..., str]  # render(messages, add_generation_prompt=True, **options) -> str
    stop_tokens: tuple[str, ...]  # a reply ends at the first of these

    def encode(self, tokenizer: HFTokenizer, messages: list[Message], add_generation_prompt: bool = True,
               **options: Any) -> list[int]:
        return tokenizer.encode(self.render(messages, add_generation_prompt, **options), add_special_tokens=False)

    def stop_ids(self, tokenizer: HFTokenizer) -> list[int]:
        return [tokenizer.added_tokens[t] for t in self.stop_tokens if t in tokenizer.added_tokens]


TEMPLATES = {
    "llama": ChatTemplate("llama3", render_llama3, ("<|eot_id|>", "<|end_of_text|>")),
    "qwen3": ChatTemplate("qwen3", render_qwen3, ("<|im_end|>", "<|endoftext|>")),
}
_NEEDED = {"llama": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           "qwen3": ("<|im_start|>", "<|im_end|>")}


def chat_template_for(model_type: str, tokenizer: HFTokenizer) -> ChatTemplate | None:
    """The native template of ``model_type``, or None when the tokenizer lacks its special tokens."""
    if model_type not in TEMPLATES or any(t not in tokenizer.added_tokens for t in _NEEDED[model_type]):
        return None
    return TEMPLATES[model_type]
