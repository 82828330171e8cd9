"""Every ```python block of README.md and docs/*.md runs as written (CPU, small sizes)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks():
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            yield pytest.param(m.group(1), id=f"{path.relative_to(ROOT)}:{line}")


def test_readme_and_docs_have_python_blocks():
    ids = [p.id for p in python_blocks()]
    assert sum(i.startswith("README.md") for i in ids) >= 4, ids


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint:UserWarning")
@pytest.mark.parametrize("code", list(python_blocks()))
def test_block_runs(code):
    for module in re.findall(r"^\s*import (\w+)", code, re.M):
        if module == "gateloop_transformer" and importlib.util.find_spec(module) is None:
            pytest.skip("gateloop-transformer 0.2.5 is not installed (the test extra)")
    exec(compile(code, "<block>", "exec"), {"__name__": "__readme__"})
