"""Kernels compiled for sm_90 in a child process (no GPU needed: Triton's ahead-of-time path and its bundled
ptxas; the tests' own process runs Triton's interpreter, whose functions that path cannot take)."""

import json
import os
import subprocess
import sys

import pytest


def run(code: str, payload) -> object:
    """Run `code` (Python reading `json.loads(sys.argv[1])`, printing one JSON line last) in a child process
    without TRITON_INTERPRET; return that line's value. Skips where Triton has no NVIDIA backend."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
