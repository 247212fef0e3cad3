"""Multi-process calibration: ``torchrun --nproc-per-node 2 --no-python peft-persona extract`` on the gloo backend
gives masks bit-identical to one process, for wanda, contrastive and obs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama, tiny_tokenizer, word_texts

CLI = Path(sys.executable).with_name("peft-persona")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    for name, seed in (("e", 1), ("i", 2)):  # 9 texts each at batch size 2: 5 batches, dealt 3 / 2 to the ranks
        rows = "".join(f"{t},{t} w7,w8\n" for t in word_texts(seed, 9, max_len=20))
        (folder / f"{name}.csv").write_text("question,matching,not_matching\n" + rows)
    return folder


def extract(model_dir: Path, out: Path, method: str, processes: int) -> subprocess.CompletedProcess:
    personas = ["extro", "intro"] if method == "contrastive" else ["extro"]
    args = [
        str(CLI),
        "extract",
        "--model",
        str(model_dir / "model"),
        "--method",
        method,
        "--sparsity",
        "0.5",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    for name, file in zip(personas, ("e", "i"), strict=False):
        args += ["--persona", f"{name}={model_dir / (file + '.csv')}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same BLAS threads in every process
    if processes > 1:
        args = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(processes),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "--no-python",
            *args,
        ]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.parametrize("method", ["wanda", "contrastive", "obs"])
def test_two_gloo_processes_give_bit_identical_masks(model_dir, tmp_path, method):
    extract(model_dir, tmp_path / "one", method, processes=1)
    extract(model_dir, tmp_path / "two", method, processes=2)
    adapters = sorted(p.name for p in (tmp_path / "one").iterdir() if p.is_dir())
    assert adapters and adapters == sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_dir())
    for name in adapters:  # the packed bits as saved
        one = load_file(tmp_path / "one" / name / "adapter_model.safetensors")
        two = load_file(tmp_path / "two" / name / "adapter_model.safetensors")
        assert one.keys() == two.keys() and len(one) == 14
        for layer in one:
            assert torch.equal(one[layer], two[layer]), (name, layer)
            assert 0 < int(one[layer].sum()) < 255 * one[layer].numel()  # neither empty nor full
    summary = (tmp_path / "two" / "summary.json").read_text()
    assert '"processes": 2' in summary
    assert not list(tmp_path.glob("*.staging*"))  # rank 0 alone wrote, atomically
