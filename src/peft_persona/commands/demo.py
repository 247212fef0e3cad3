"""``peft-persona demo``: a local browser demo of persona adapters, base and persona replies side by side."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..models import DEFAULT_MODEL
from . import preflight

# The README's main command, which writes the default --adapters folder (there ``masks``).
MAIN_COMMAND = (
    "peft-persona extract --persona extravert=builtin:extraversion#yes --persona introvert=builtin:extraversion#no "
    "--method contrastive --sparsity 0.2 --strength 0.5 --out {out}"
)
INSTALL = 'pip install "peft-persona[demo]"'


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command and its options."""
    parser = subparsers.add_parser(
        "demo",
        help="serve a local browser demo: base and persona replies side by side, persona picker, strength slider",
        description=(
            "Load the base model and the persona adapters in --adapters and serve a Gradio app on --host:--port: one "
            "prompt, the base model's greedy reply beside the active persona's, a persona picker, a strength slider "
            f"and each adapter's facts. Needs gradio ({INSTALL})."
        ),
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"Hub id, local path or embedded name (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load (dequantised to float32)")
    parser.add_argument(
        "--adapters",
        nargs="+",
        type=Path,
        default=[Path("masks")],
        metavar="DIR",
        help="folders of saved persona adapters, one sub-folder each (default: masks, as the README's main "
        "command writes it)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48, help="most tokens per reply (default 48)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.set_defaults(func=run)


def check_arguments(args: argparse.Namespace) -> dict[str, Path]:
    """The adapters by name, every argument checked before the model loads; raises one-line errors."""
    from ..demo import find_adapters

    preflight.check_positive(args.max_new_tokens, "--max-new-tokens")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: must be in 1-65535")
    for folder in args.adapters:
        if not folder.expanduser().is_dir():
            command = MAIN_COMMAND.format(out=folder)
            raise ValueError(f"--adapters {folder}: no such folder; make it with `{command}`")
    preflight.check_model(args.model, args.gguf_file)
    with preflight.naming("--adapters", " ".join(str(folder) for folder in args.adapters)):
        return find_adapters([folder.expanduser() for folder in args.adapters])


def import_gradio() -> Any:
    """The ``gradio`` module, imported with ``GRADIO_ANALYTICS_ENABLED=False``; a ``ValueError`` naming the extra to
    install if it is missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError:
        raise ValueError(f"gradio is not installed; install it with `{INSTALL}`") from None
    return gradio


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoSession, build_app, load_adapters
    from ..models import load_model

    adapters = check_arguments(args)
    import_gradio()
    with preflight.naming("--model", args.model):
        model, tokenizer = load_model(args.model, gguf_file=args.gguf_file)
    peft_model, configs = load_adapters(model, adapters)
    app = build_app(DemoSession(peft_model, tokenizer, configs, args.max_new_tokens))
    print(f"peft-persona demo: {', '.join(configs)} on {args.model}; serving on http://{args.host}:{args.port}")
    app.launch(server_name=args.host, server_port=args.port, share=False)
    return 0
