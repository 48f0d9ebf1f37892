"""The README's Python snippet runs and prints what the README says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippet_prints_what_it_claims():
    text = README.read_text()
    code, printed = re.search(
        r"```python\n(.*?)```\n\nprints[^\n]*\n\n```\n(.*?)```", text, re.S
    ).groups()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})  # noqa: S102 - our own README
    assert out.getvalue() == printed
