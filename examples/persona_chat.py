"""A persona chat service: one base model, one mask adapter per persona, each request answered in its own persona.

    python examples/persona_chat.py                                    # extract extravert/introvert, serve on :8000
    python examples/persona_chat.py --adapters out/extraversion-repo   # masks saved by extract_eval_push_load.py

Endpoints (JSON over HTTP, standard library only):

* ``GET  /personas``: the personas served (``"__base__"`` is the base model);
* ``POST /chat``  ``{"persona": "introvert", "message": "..."}``: one greedy reply;
* ``POST /batch`` ``{"requests": [{"persona": ..., "message": ...}, ...]}``: all requests in one mixed-persona batch
  (``generate(..., adapter_names=[...])``), one matmul per distinct persona per layer.

Try it with ``curl -s localhost:8000/chat -d '{"persona": "introvert", "message": "Plans tonight?"}'``. One lock
serialises generation: a chat switches the active adapter (``set_adapter``, which rewrites only the weight entries
where the two masks differ), a batch leaves it alone.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

BASE = "__base__"


class PersonaChat:
    """Replies from ``model`` (holding one adapter per persona) to ``{"persona", "message"}`` requests."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 24) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.personas = sorted(model.peft_config) + [BASE]
        self.lock = threading.Lock()
        tokenizer.padding_side = "left"  # batched generation continues every row from its last real token

    def check(self, request: Any) -> tuple[str, str]:
        """``(persona, message)`` of a request; a ``ValueError`` naming the bad field otherwise."""
        if not isinstance(request, dict):
            raise ValueError(f"a request must be a JSON object, got {type(request).__name__}")
        persona, message = request.get("persona"), request.get("message")
        if persona not in self.personas:
            raise ValueError(f"unknown persona {persona!r}; this server has {self.personas}")
        if not isinstance(message, str) or not message.strip():
            raise ValueError("field `message` must be a non-empty string")
        return persona, message

    def chat(self, request: Any) -> dict:
        return self.batch([request])[0]

    def batch(self, requests: Sequence[Any]) -> list[dict]:
        """Greedy replies to all ``requests`` from one ``generate`` call, each row under its own persona."""
        checked = [self.check(r) for r in requests]
        prompts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True
            )
            for _, m in checked
        ]
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with self.lock, torch.no_grad():
            out = self.model.generate(
                **inputs,
                adapter_names=[p for p, _ in checked],
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        replies = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [{"persona": p, "message": m, "reply": r.strip()} for (p, m), r in zip(checked, replies, strict=True)]


def make_server(chat: PersonaChat, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server answering ``/personas``, ``/chat`` and ``/batch`` with ``chat`` (``port=0``: any free port)."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if self.path == "/personas":
                self._send(200, {"personas": chat.personas})
            else:
                self._send(404, {"error": f"no endpoint {self.path}; use /personas, /chat or /batch"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                if self.path == "/chat":
                    self._send(200, chat.chat(request))
                elif self.path == "/batch":
                    if not isinstance(request, dict) or not isinstance(request.get("requests"), list):
                        raise ValueError('a batch must be {"requests": [...]}')
                    self._send(200, {"replies": chat.batch(request["requests"])})
                else:
                    self._send(404, {"error": f"no endpoint {self.path}; use /chat or /batch"})
            except (ValueError, json.JSONDecodeError) as err:
                self._send(400, {"error": str(err)})

        def log_message(self, format: str, *args: Any) -> None:  # keep the console for the replies
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: Sequence[str] | None = None) -> None:
    from _common import extract_pair, load_embedded

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapters", default=None, help="folder with one adapter folder per persona; default: extract")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    model, tokenizer = load_embedded(args.model)
    if args.adapters:
        from pathlib import Path

        for folder in sorted(p for p in Path(args.adapters).iterdir() if (p / "adapter_config.json").is_file()):
            model.load_adapter(str(folder), adapter_name=folder.name)  # plain transformers API
    else:
        model = extract_pair(model, tokenizer)
    server = make_server(PersonaChat(model.eval(), tokenizer, args.max_new_tokens), args.host, args.port)
    print(f"serving {sorted(model.peft_config)} on http://{args.host}:{server.server_port}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
