"""benchmarks/gpu.sh and gpu_stream.py: argument checks, the refusal without CUDA, and a tiny CPU dry run.

The real measurement needs a CUDA GPU; these tests run every code path on a small config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_stream

ROOT = Path(__file__).parent.parent


def run_script(*args: str, hide_gpus: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args], capture_output=True, text=True,
                          timeout=240, env=env, cwd=ROOT)


def test_defaults_measure_100k_tokens():
    args = gpu_stream.parse_args([])
    assert args.device == "cuda"
    assert args.tokens == 100_000
    assert args.plain_cap == 32_768
    assert not args.tiny
    config = gpu_stream.model_config(tiny=False)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (2048, 16, 32, 8, 8192)


@pytest.mark.parametrize("flag", ["--tokens", "--plain-cap", "--decode-tokens"])
def test_non_positive_counts_rejected(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_stream.parse_args([flag, "0"])
    assert exit_info.value.code == 2
    assert f"invalid {flag} 0" in capsys.readouterr().err


def test_refuses_without_cuda():
    result = run_script(hide_gpus=True)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_refuses_full_config_on_cpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_stream.check_device(gpu_stream.parse_args(["--device", "cpu"]))
    assert exit_info.value.code == 2
    assert "pass --tiny for a dry run" in capsys.readouterr().err


def test_tiny_cpu_dry_run(tmp_path):
    out = tmp_path / "gpu_stream.json"
    result = run_script("--device", "cpu", "--tiny", "--tokens", "512", "--plain-cap", "300",
                        "--decode-tokens", "16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "ctxmem" in result.stdout
    rows = {row["system"]: row for row in json.loads(out.read_text())["rows"]}
    ours, plain = rows["ctxmem (4 sinks + window)"], rows["transformers DynamicCache"]
    assert ours["streamed"] == 512
    assert ours["cache_entries"] <= 128  # the tiny config's positions
    assert plain["streamed"] == 300
    assert plain["cache_entries"] == 300  # a DynamicCache keeps every token
    assert plain["stopped_by"] == "--plain-cap 300"
    assert list(ours["decode_ms"]) == ["512"]
    assert all(ms > 0 for ms in ours["decode_ms"].values())
