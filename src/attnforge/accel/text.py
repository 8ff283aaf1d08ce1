"""Prompts in, text out: token ids of the prompts (chat template where asked), and streamed text with stops.

`TextStream` turns one sequence's tokens into text pieces as they come: it decodes the whole sequence each
time (byte-level tokenizers only make sense on whole sequences) and emits what is new, holding back an
incomplete UTF-8 character and any tail that could still become a stop string; at a stop string the text ends
just before it.
"""

from __future__ import annotations

import torch

Prompt = str | list[int] | list[dict] | torch.Tensor


def prompt_token_lists(prompts, tokenizer, *, chat: bool, vocab_size: int) -> list[list[int]]:
    """One token list per prompt.

    A prompt is a string (tokenized; with `chat=True` wrapped as one user message of the chat template), a
    list of messages (`[{"role": ..., "content": ...}, ...]`, always through the chat template), a list of
    token ids, or a tensor `[L]`; several prompts come as a list of these or a tensor `[B, L]`.
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2) or prompts.dtype.is_floating_point:
            raise ValueError(f"a tensor prompt must be integer token ids [L] or [B, L], got {prompts.dtype} "
                             f"{tuple(prompts.shape)}")  # fmt: skip
        rows = prompts.reshape(-1, prompts.shape[-1]).tolist()
    elif isinstance(prompts, str) or _is_token_list(prompts) or _is_messages(prompts):
        rows = [prompts]
    elif isinstance(prompts, (list, tuple)) and prompts:
        rows = list(prompts)
    else:
        raise ValueError(
            f"prompts={prompts!r}: expected a string, token ids, chat messages, or a list of them"
        )
    return [_tokens(row, tokenizer, chat, vocab_size) for row in rows]


def _is_token_list(value) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    )


def _is_messages(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(x, dict) for x in value)


def _tokens(prompt, tokenizer, chat: bool, vocab_size: int) -> list[int]:
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if isinstance(prompt, str) or _is_messages(prompt):
        if tokenizer is None:
            raise ValueError(
                "text prompts need a tokenizer: accelerate(model, tokenizer=...), or pass token ids"
            )
        templated = chat or not isinstance(prompt, str)
        if templated:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            prompt = chat_text(tokenizer, messages)
        ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    elif _is_token_list(prompt):
        ids = list(prompt)
    else:
        raise ValueError(f"prompt {prompt!r}: expected a string, token ids or chat messages")
    if not ids:
        raise ValueError("a prompt has no tokens; every prompt needs at least one")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The conversation through the tokenizer's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; pass plain text with chat=False")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class TextStream:
    """One sequence's text, piece by piece, ending at the first stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; the new text that is certain (may be ''). Sets `stopped` at a stop string."""
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            return ""
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(full[:cut])
        return self._emit(full[: len(full) - self._held(full)])

    def flush(self) -> str:
        """At the end of the sequence: everything not yet emitted (no stop string was found)."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _emit(self, upto: str) -> str:
        piece = upto[len(self.text) :] if upto.startswith(self.text) else ""
        self.text = upto if upto.startswith(self.text) else self.text
        return piece

    def _held(self, full: str) -> int:
        """Length of the longest tail of `full` that begins some stop string (it may yet complete)."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(full)), longest, -1):
                if full.endswith(stop[:size]):
                    longest = size
                    break
        return longest
