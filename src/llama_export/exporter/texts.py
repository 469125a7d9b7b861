"""The project's text sets (exporter/data/texts, written for it, public domain): calibration text of five kinds,
which INT4 calibration reads, and held-out text of the same kinds, which only measurements read. Dialogue is
stored as conversations and rendered in the model's own chat format."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Callable

KINDS = ("prose", "dialogue", "code", "numbers", "languages")
SPLITS = ("calibration", "heldout")


def read(split: str, kind: str, render_chat: Callable[[list[dict]], str]) -> str:
    """One kind's text of a split; each dialogue conversation rendered by `render_chat`."""
    folder = resources.files("llama_export.exporter").joinpath(f"data/texts/{split}")
    if kind == "dialogue":
        conversations = json.loads(folder.joinpath("dialogue.json").read_text(encoding="utf-8"))
        return "\n".join(render_chat(messages) for messages in conversations)
    return folder.joinpath(f"{kind}.txt").read_text(encoding="utf-8")


def chat_renderer(tokenizer_folder: Path) -> Callable[[list[dict]], str]:
    """The chat template a tokenizer folder carries (tokenizer_config.json or chat_template.jinja), applied by
    transformers; without one, 'role: content' lines."""
    from llama_export.runtimes.chat import has_chat_template

    if not has_chat_template(tokenizer_folder):
        return lambda messages: "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n"
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_folder))
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)
