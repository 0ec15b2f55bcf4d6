"""The README's complete code examples run as written (each in a fresh interpreter)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def complete_examples() -> list[str]:
  """The README's python blocks that are whole programs (they import what they use)."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  return [b for b in blocks if re.search(r"^import (os|flax)", b, flags=re.M)]


def test_readme_has_the_examples():
  # The training loop, the pmap and the shard_map patterns.
  assert len(complete_examples()) == 3


@pytest.mark.slow
@pytest.mark.parametrize("index", range(3))
def test_readme_example_runs(index, tmp_path):
  code = complete_examples()[index]
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
