"""Serve two personas from one base model, switching with ``set_adapter`` per request.

    python examples/serve_two_personas.py
    python examples/serve_two_personas.py --adapters out/extraversion-repo   # masks saved by the first example

One copy of the base weights serves both personas: each request activates its persona's mask (``set_adapter``
rewrites only the weight entries the two masks drop) and generates at base speed. A lock makes ``set_adapter`` +
``generate`` atomic, as a web server handling requests on several threads needs.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence

from _common import extract_pair, load_embedded, reply, write_json

REQUESTS = [
    {"persona": "extravert", "prompt": "What are you doing this weekend?"},
    {"persona": "introvert", "prompt": "What are you doing this weekend?"},
    {"persona": "introvert", "prompt": "How do you feel about parties?"},
    {"persona": "extravert", "prompt": "How do you feel about parties?"},
    {"persona": "extravert", "prompt": "What are you doing this weekend?"},
]


class PersonaServer:
    """Answers ``{"persona", "prompt"}`` requests with one model holding one adapter per persona."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 24) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.personas = list(model.peft_config)
        self.lock = threading.Lock()

    def handle(self, request: dict) -> dict:
        persona = request["persona"]
        if persona not in self.personas:
            return {"error": f"unknown persona {persona!r}; this server has {self.personas}"}
        with self.lock:
            started = time.perf_counter()
            self.model.set_adapter(persona)
            switched = time.perf_counter()
            text = reply(self.model, self.tokenizer, request["prompt"], self.max_new_tokens)
        return {
            "persona": persona,
            "prompt": request["prompt"],
            "reply": text,
            "switch_ms": round((switched - started) * 1e3, 3),
        }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--adapters", default=None, help="folder with extravert/ and introvert/ adapters; default: extract"
    )
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--summary-json", default=None)
    args = parser.parse_args(argv)

    model, tokenizer = load_embedded(args.model)
    if args.adapters:
        for name in ("extravert", "introvert"):
            model.load_adapter(f"{args.adapters}/{name}", adapter_name=name)  # plain transformers API
    else:
        model = extract_pair(model, tokenizer)
    server = PersonaServer(model, tokenizer, args.max_new_tokens)
    responses = [server.handle(r) for r in REQUESTS]
    responses.append(server.handle({"persona": "pirate", "prompt": "Ahoy?"}))
    for r in responses:
        print(f"[{r.get('persona', '?')}] {r.get('prompt', '')} -> {r.get('reply', r.get('error'))}")
    summary = {"responses": responses, "personas": server.personas}
    write_json(args.summary_json, summary)
    return summary


if __name__ == "__main__":
    main()
