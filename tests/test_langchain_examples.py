"""The LangChain examples run offline on the reference model and exit 0, under the test's Redis prefix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, prefix: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CTXMEM_REDIS_URL": REDIS_URL, "CTXMEM_PREFIX": prefix, "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_agent_example_runs_the_models_tool_call(redis_client):
    client, prefix = redis_client
    result = run_example("langchain_agent.py", prefix)

    assert result.returncode == 0, result.stderr[-2000:]
    call = re.search(r"tool call: (\w+)\(\{'city': '([^']+)'\}\)", result.stdout)
    assert call, result.stdout
    assert call.group(1) == "weather"
    result_line = re.search(r"tool result: (.+)", result.stdout).group(1)
    assert re.search(r"answer: .*" + re.escape(result_line), result.stdout), result.stdout
    assert list(client.scan_iter(match=f"{prefix}*")) == []


def test_multi_session_example_resumes_in_each_process(redis_client):
    client, prefix = redis_client
    result = run_example("multi_session_chat.py", prefix)

    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[turn")]
    assert len(lines) == 6
    read = [int(m.group(1)) for m in map(re.compile(r"\((\d+) of \d+ prompt tokens").search, lines)]
    assert read[:2] == [0, 0]
    assert all(count > 0 for count in read[2:])
    assert list(client.scan_iter(match=f"{prefix}*")) == []
