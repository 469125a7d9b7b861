"""tokenizer.model of a Meta checkpoint as the tokenizer.json every runtime here reads: a SentencePiece model (LLaMA 1
and 2, Code Llama) through transformers' converter, or tiktoken's base64-rank file (LLaMA 3) as a byte-level BPE
with LLaMA 3's split pattern and its 256 special tokens after the ranks. Both add the BOS token, as Meta's
generation code does."""

from __future__ import annotations

import base64
import binascii
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from llama_export.exporter.errors import UserError

# LLaMA 3's pre-tokenizer split (llama-models' Tokenizer.pat_str)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_COUNT = 256
_MAX_FILE = 64 << 20  # LLaMA 3's file is 2.2 MB
# a token of at most 512 bytes (LLaMA 3's longest is far shorter; the BPE conversion is quadratic in it), a rank
# below 10^10
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/=]{1,684} \d{1,10}")


def llama3_special_tokens(scaled_rope: bool) -> list[str]:
    """The names llama-models gives ids after the ranks: 3.0's list, or 3.1's (eom, python tag; LLaMA 3.1 and later
    are the ones with scaled RoPE)."""
    if scaled_rope:
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        first_reserved = 3
    else:
        named = ["<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4)),
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        first_reserved = 5
    return named + [f"<|reserved_special_token_{first_reserved + i}|>"
                    for i in range(LLAMA3_SPECIAL_COUNT - len(named))]


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's file: a line `<base64 token bytes> <rank>` per token, ranks 0..n-1 each once."""
    text = path.read_bytes()
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        if not _RANK_LINE.fullmatch(line):
            raise UserError(f"{path}: line {number} is not '<base64 token> <rank>' (a tiktoken file)")
        token, rank = line.split()
        try:
            token = base64.b64decode(token, validate=True)
        except binascii.Error:
            raise UserError(f"{path}: line {number} holds invalid base64") from None
        if token in ranks:
            raise UserError(f"{path}: line {number} repeats a token (first given rank {ranks[token]})")
        ranks[token] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: the ranks are not 0 to {len(ranks) - 1}, each once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise UserError(f"{path}: some single bytes have no rank; tiktoken's BPE needs all 256")
    return ranks


def _tiktoken_converter(ranks: dict[bytes, int], special: list[str]):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url):  # the ranks read and checked here (no tiktoken package needed)
            return ranks

    return Converter(vocab_file="", pattern=LLAMA3_PATTERN, extra_special_tokens=special)


@dataclass
class MetaTokenizer:
    path: Path | None  # None: the folder has no tokenizer.model
    kind: str = ""  # "tiktoken" or "sentencepiece"
    bos: str | None = None
    eos: list[str] = field(default_factory=list)
    unk: str | None = None
    ids: dict[str, int] = field(default_factory=dict)  # every token above by id
    ranks: dict[bytes, int] | None = None
    special: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [self.path] if self.path else []

    @classmethod
    def open(cls, folder: Path, vocab_rows: int, scaled_rope: bool) -> MetaTokenizer:
        path = folder / "tokenizer.model"
        if not path.is_file():
            return cls(None)
        try:
            if path.stat().st_size > _MAX_FILE:
                raise UserError(f"{path}: {path.stat().st_size} bytes; not a tokenizer (at most {_MAX_FILE})")
            with open(path, "rb") as f:
                head = f.readline(4096).rstrip(b"\r\n")
        except OSError as exc:
            raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        if _RANK_LINE.fullmatch(head):
            return cls._tiktoken(path, vocab_rows, scaled_rope)
        return cls._sentencepiece(path, vocab_rows)

    @classmethod
    def _tiktoken(cls, path: Path, vocab_rows: int, scaled_rope: bool) -> MetaTokenizer:
        ranks = read_tiktoken_ranks(path)
        special = llama3_special_tokens(scaled_rope)
        if len(ranks) + len(special) != vocab_rows:
            raise UserError(f"{path}: {len(ranks)} ranks and LLaMA 3's {len(special)} special tokens make "
                            f"{len(ranks) + len(special)} ids; the embedding has {vocab_rows} rows")
        ids = {name: len(ranks) + i for i, name in enumerate(special)}
        eos = ["<|end_of_text|>", "<|eot_id|>"] + (["<|eom_id|>"] if scaled_rope else [])
        return cls(path, "tiktoken", "<|begin_of_text|>", eos, None, ids, ranks, special)

    @classmethod
    def _sentencepiece(cls, path: Path, vocab_rows: int) -> MetaTokenizer:
        import sentencepiece

        try:
            model = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise UserError(f"{path}: neither a tiktoken rank file nor a SentencePiece model ({exc})") from None
        if model.bos_id() < 0 or model.eos_id() < 0:
            raise UserError(f"{path}: the SentencePiece model has no {'BOS' if model.bos_id() < 0 else 'EOS'} "
                            "piece; LLaMA's generation needs both")
        if model.vocab_size() > vocab_rows:
            raise UserError(f"{path}: {model.vocab_size()} tokens, more than the embedding's {vocab_rows} rows")
        named = {"bos": model.bos_id(), "eos": model.eos_id(), "unk": model.unk_id()}
        ids = {model.id_to_piece(i): i for i in named.values() if i >= 0}
        piece = {key: model.id_to_piece(i) if i >= 0 else None for key, i in named.items()}
        return cls(path, "sentencepiece", piece["bos"], [piece["eos"]] if piece["eos"] else [], piece["unk"], ids)

    def special_ids(self) -> dict:
        """The config's bos/eos/pad ids (None without a tokenizer)."""
        if self.path is None:  # no defaults: transformers' (1 and 2) would be wrong for LLaMA 3
            return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        eos = [self.ids[name] for name in self.eos]
        return {"bos_token_id": self.ids.get(self.bos), "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
                "pad_token_id": None}

    def write(self, dest: Path, max_length: int) -> list[str]:
        if self.path is None:
            return []
        tokenizer = self._sentencepiece_json() if self.kind == "sentencepiece" else self._tiktoken_json()
        from tokenizers import processors

        bos = self.bos
        with_bos = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                 special_tokens=[(bos, self.ids[bos])])
        tokenizer.post_processor = with_bos if self.kind == "sentencepiece" else processors.Sequence(
            [processors.ByteLevel(trim_offsets=False), with_bos])
        tokenizer.save(str(dest / "tokenizer.json"))
        config = {"tokenizer_class": "LlamaTokenizer" if self.kind == "sentencepiece" else "PreTrainedTokenizerFast",
                  "add_bos_token": True, "add_eos_token": False, "bos_token": bos, "eos_token": self.eos[0],
                  "unk_token": self.unk, "model_max_length": max_length, "clean_up_tokenization_spaces": False}
        (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return ["tokenizer.json", "tokenizer_config.json"]

    def _tiktoken_json(self):
        return _tiktoken_converter(self.ranks, self.special).converted()

    def _sentencepiece_json(self):
        """transformers' SentencePiece conversion, reading the model alone from a folder of its own."""
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(self.path, Path(tmp) / "tokenizer.model")
            try:
                converted = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
            except Exception as exc:  # the converter raises several types on models it cannot convert
                raise UserError(f"{self.path}: transformers cannot convert this SentencePiece model ({exc})") from None
        return converted.backend_tokenizer
