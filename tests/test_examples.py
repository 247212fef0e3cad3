"""Every script in examples/ runs on the embedded SmolLM2-135M-Instruct; the push example against the loopback Hub."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import TOKENS
from peft_persona.inspection import inspect_adapters

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
OWNER = next(iter(TOKENS))
pytestmark = pytest.mark.real_model


def run_example(script: str, args: list[str], env: dict, cwd: Path) -> dict:
    summary = cwd / f"{script}.json"
    # One BLAS thread: these are small-batch forward passes, and test processes running side by side oversubscribe
    # the cores badly with more.
    env = dict(env, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args, "--summary-json", str(summary)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(summary.read_text())


@pytest.fixture(scope="module")
def pushed_example(hub, tmp_path_factory):
    """extract_eval_push_load.py, pushing to ``user/smollm2-extraversion`` on the loopback Hub."""
    import os

    cwd = tmp_path_factory.mktemp("example1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "PEFT_PERSONA_NO_AUTOLOAD"}
    src = str(EXAMPLES.parent / "src")
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(cwd / "hf-home"),
        HF_TOKEN=OWNER,
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p),
    )
    summary = run_example(
        "extract_eval_push_load.py", ["--repo-id", "user/smollm2-extraversion", "--out", "repo"], env, cwd
    )
    return summary, cwd / "repo", env


def test_extract_eval_push_load(hub, pushed_example, tmp_path):
    summary, repo, _ = pushed_example
    assert summary["source"] == "user/smollm2-extraversion"
    assert summary["round_trip_exact"] == {"extravert": True, "introvert": True}  # Hub copy == extracted adapter
    assert all(isinstance(r, str) and r for r in summary["replies"].values())
    rows = {r["adapter"]: r for r in summary["evaluation"]}
    assert set(rows) == {"extravert", "introvert", "(base model)"}
    for row in rows.values():  # the package's metrics: accuracy with a Wilson CI, margin with a bootstrap CI
        margin, accuracy = row["extraversion_margin"], row["extravert_answers"]
        assert margin["ci_low"] <= margin["margin"] <= margin["ci_high"] and margin["n"] == 12
        assert accuracy["ci_low"] <= accuracy["accuracy"] <= accuracy["ci_high"] and accuracy["n"] == 12
    remote = {
        s.name: s for s in inspect_adapters("user/smollm2-extraversion", endpoint=hub.endpoint, cache_dir=tmp_path)
    }
    assert sorted(remote) == ["extravert", "introvert"]
    for s in remote.values():
        assert s.config["method"] == "contrastive" and s.config["sparsity"] == 0.2
        assert s.config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert len(s.density) == 210  # every linear layer of the 30 blocks, 20% of each row removed
        assert all(abs(d - 0.8) < 1 / 576 for d in s.density.values()), s.density
    assert remote["extravert"].config["opposite_persona"] == "introvert"
    card = (repo / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "Yes/No on 12 held-out statements" in card


def test_serve_two_personas(pushed_example):
    _, repo, env = pushed_example
    summary = run_example("serve_two_personas.py", ["--adapters", str(repo)], env, repo.parent)
    first, *_, last, unknown = summary["responses"]
    assert summary["personas"] == ["extravert", "introvert"]
    assert first["persona"] == last["persona"] == "extravert" and first["prompt"] == last["prompt"]
    assert first["reply"] == last["reply"]  # switching to the other persona and back leaves no trace
    assert "pirate" in unknown["error"]
    assert all(r["switch_ms"] >= 0 for r in summary["responses"][:-1])


def test_combine_masks(pushed_example):
    _, repo, env = pushed_example
    summary = run_example("combine_masks.py", [], env, repo.parent)
    d = {name: a["density"] for name, a in summary["adapters"].items()}
    assert d["both"] <= min(d["extravert"], d["introvert"]) <= max(d["extravert"], d["introvert"]) <= d["either"]
    assert d["both"] + d["either"] == pytest.approx(d["extravert"] + d["introvert"], abs=1e-5)  # inclusion-exclusion
    assert summary["vote_config"] == {"combined_from": ["extravert", "introvert", "magnitude"], "how": "majority"}


def test_persona_chat_over_http(pushed_example, tmp_path):
    """persona_chat.py on localhost, driven as a client would: each request in its persona, and a mixed batch."""
    import urllib.error
    import urllib.request

    _, repo, env = pushed_example
    env = dict(env, OMP_NUM_THREADS="1")
    with open(tmp_path / "stderr.txt", "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLES / "persona_chat.py"),
                "--adapters",
                str(repo),
                "--port",
                "0",
                "--max-new-tokens",
                "10",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            cwd=repo.parent,
        )
        try:
            line = server.stdout.readline()
            assert "serving" in line, (tmp_path / "stderr.txt").read_text()[-3000:]
            url = line.split(" on ")[1].split()[0]

            def call(path, payload=None):
                data = None if payload is None else json.dumps(payload).encode()
                try:
                    with urllib.request.urlopen(urllib.request.Request(url + path, data=data), timeout=300) as response:
                        return response.status, json.loads(response.read())
                except urllib.error.HTTPError as err:
                    return err.code, json.loads(err.read())

            assert call("/personas") == (200, {"personas": ["extravert", "introvert", "__base__"]})
            message = "What are you doing this weekend?"
            single = {
                p: call("/chat", {"persona": p, "message": message}) for p in ("extravert", "introvert", "__base__")
            }
            assert all(status == 200 and body["reply"] for status, body in single.values())
            assert len({body["reply"] for _, body in single.values()}) >= 2  # the personas answer differently
            status, batch = call(
                "/batch",
                {"requests": [{"persona": p, "message": message} for p in ("introvert", "__base__", "extravert")]},
            )
            assert status == 200
            assert [r["reply"] for r in batch["replies"]] == [
                single[p][1]["reply"] for p in ("introvert", "__base__", "extravert")
            ]
            status, error = call("/chat", {"persona": "pirate", "message": message})
            assert status == 400 and "pirate" in error["error"]
            status, error = call("/batch", {"requests": [{"persona": "introvert", "message": ""}]})
            assert status == 400 and "`message`" in error["error"]
        finally:
            server.terminate()
            server.wait(timeout=30)


def test_three_replies_match_the_readme(tmp_path):
    """The README's three greedy replies are exactly what examples/three_replies.py prints, with the tuned settings."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    src = str(EXAMPLES.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    summary = run_example("three_replies.py", ["--check", str(EXAMPLES.parent / "README.md")], env, tmp_path)
    lines = [line for line in summary["block"].splitlines() if line.startswith("> **")]
    assert [line.split(":**")[0] for line in lines] == ["> **User", "> **base", "> **extravert", "> **introvert"]
    assert all(len(line.split(":**")[1].split()) >= 5 for line in lines)  # sentences, not empty
    assert summary["settings"] == {"method": "contrastive", "sparsity": 0.2, "strength": 0.5, "target": "all"}
