"""Conversations with a package: its chat template renders the messages, and the KV cache keeps every turn, so a
new turn runs only the tokens the cache does not hold yet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from llama_export.runtimes.generate import Decoder, TextStream
from llama_export.runtimes.onnx_package import PackageError
from llama_export.runtimes.sampling import Sampler
from llama_export.runtimes.tokenizer import PackageTokenizer


def has_chat_template(folder: Path) -> bool:
    """Whether the package carries a chat template (tokenizer_config.json's chat_template, or chat_template.jinja)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError) as exc:
        raise PackageError(f"{config}: unreadable ({exc})") from None


class ChatTemplate:
    """The package's template rendered by transformers, as transformers' own apply_chat_template renders it."""

    def __init__(self, folder: Path):
        from transformers import PreTrainedTokenizerFast

        try:
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise PackageError(f"{folder}: the tokenizer files do not load ({exc})") from None

    def render(self, messages: list[dict]) -> str:
        """The conversation so far, ending with the prompt for the assistant's reply."""
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template is the package's code: any error in it is the package's
            raise PackageError(f"the package's chat template fails on this conversation: {exc}") from None


class Chat:
    """One conversation: `say` streams the reply to a user message; `reset` starts over. `prompt_tokens_run` tells
    how many tokens the last turn ran through the model before replying (the cache held the rest),
    `reply_tokens` how many its reply has."""

    def __init__(self, package, folder: Path, system: str | None = None, sampler: Sampler | None = None,
                 max_new_tokens: int = 256, tokenizer: PackageTokenizer | None = None):
        self.package, self.folder = package, Path(folder)
        self.tokenizer = tokenizer or PackageTokenizer(folder)
        self.template = ChatTemplate(folder) if has_chat_template(folder) else None
        self.system, self.sampler, self.max_new_tokens = system, sampler or Sampler(), max_new_tokens
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.decoder = Decoder(self.package)
        self.cached: list[int] = []  # the token ids the KV cache holds, in order
        self.prompt_tokens_run = self.reply_tokens = 0

    def say(self, text: str) -> Iterator[str]:
        """The reply's text, piece by piece as tokens come; the message and reply join the conversation."""
        if self.template is None:  # raw continuation of each message on its own
            self.reset()
            prompt = self.tokenizer.encode(text)
        else:
            rendered = self.template.render(self.messages + [{"role": "user", "content": text}])
            prompt = self.tokenizer.encode(rendered, add_special_tokens=False)  # the template holds the BOS
        if not prompt:
            raise PackageError("the message encodes to no tokens")
        limit = self.package.context_length
        if limit and len(prompt) + self.max_new_tokens > limit:
            raise PackageError(f"the conversation's {len(prompt)} tokens plus {self.max_new_tokens} new ones pass the "
                               f"package's context of {limit}; /reset starts a new conversation")
        logits = self._feed(prompt)
        self.messages.append({"role": "user", "content": text})
        reply: list[int] = []
        stream = TextStream(self.tokenizer.decode)
        try:
            for step in range(self.max_new_tokens):
                token = self.sampler(logits)
                if token in self.package.eos_token_ids:
                    break
                reply.append(token)
                yield stream.push(token)
                if step < self.max_new_tokens - 1:
                    logits = self.decoder.decode(token)
                    self.cached.append(token)
            yield stream.flush()
        finally:  # a reply cut short (Ctrl-C, an error) still closes the turn: roles keep alternating
            self.reply_tokens = len(reply)
            self.messages.append({"role": "assistant", "content": stream.decode(reply) if reply else ""})

    def _feed(self, prompt: list[int]):
        """Runs the part of `prompt` the cache does not hold; returns the last position's logits. Where the cache
        and the prompt part ways (the template re-renders the last reply differently), the cache is cut back."""
        keep = 0
        for cached, wanted in zip(self.cached, prompt):
            if cached != wanted:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)  # at least one token runs, for the next token's logits
        self.decoder.truncate(keep)
        self.cached = self.cached[:keep]  # in step with the cache should the prefill fail
        self.prompt_tokens_run = len(prompt) - keep
        logits = self.decoder.prefill(prompt[keep:])[-1]
        self.cached = list(prompt)
        return logits
