"""The README's self-contained Python quick starts run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
#: blocks that run inside a distributed rank with a user's model are shown, not executed
RUNNABLE = [b for b in BLOCKS if "inside a" not in b and "launch(work" not in b]


def test_readme_has_quick_starts():
    assert len(RUNNABLE) >= 4


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.splitlines()[1][:40] for b in RUNNABLE])
def test_readme_block_runs(block):
    exec(compile(block, str(README), "exec"), {})
