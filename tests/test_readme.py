"""Every ```python block of README.md runs as written (a fresh interpreter each; kernels under
TRITON_INTERPRET=1 without a GPU, as the snippet itself arranges)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_the_readme_has_python_snippets():
    assert SNIPPETS, f"no ```python block found in {README}"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs_as_written(snippet, tmp_path):
    env = {**os.environ, **({} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"})}
    done = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"README snippet failed:\n{snippet}\n--- stderr:\n{done.stderr[-3000:]}"
