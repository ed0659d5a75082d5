"""The README's Python API blocks (those that build a model) run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
          if "build_model(" in block]


def test_the_readme_has_its_model_blocks():
    assert len(BLOCKS) == 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_model_block_runs_as_written(index):
    namespace = {}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    assert set(namespace["outputs"].main) >= {"segmentation", "depth"}
