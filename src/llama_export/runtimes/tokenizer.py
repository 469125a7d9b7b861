"""The package's tokenizer.json through the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from llama_export.runtimes.onnx_package import PackageError


class PackageTokenizer:
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise PackageError(f"{folder}: no tokenizer.json in the package, so text cannot be encoded; copy the "
                               "model's tokenizer.json into the package folder")
        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
