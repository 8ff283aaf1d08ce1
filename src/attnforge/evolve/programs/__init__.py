"""Starting programs of the evolutionary search: self-contained kernels read as text by `initial_program`
(OpenEvolve's initial_program.py) and never imported by attnforge itself."""

from __future__ import annotations

from pathlib import Path

PROGRAMS = ("decode", "prefill")


def initial_program(kind: str) -> str:
    """The source of the starting program for `kind` ("decode" or "prefill")."""
    if kind not in PROGRAMS:
        raise ValueError(f"kind={kind!r} is not one of {PROGRAMS}")
    return Path(__file__).with_name(f"{kind}.py").read_text()
