"""Every ```python block of README.md and docs/*.md runs as written (CPU, small sizes); ./dev lists
its commands; no file speaks of how the code was developed."""

from __future__ import annotations

import importlib.util
import re
import subprocess
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


def test_dev_without_a_command_lists_them():
    proc = subprocess.run([str(ROOT / "dev")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "bench" in proc.stdout and "test" in proc.stdout, proc.stderr


# Words that describe how the code was written rather than what it does.
PROCESS_WORDS = re.compile(r"\bsessions?\b|\bsittings?\b|\bhelpers?\b|\breviewers?\b"
                           r"|\bissues? ?#?\d+|(^|[^\w{])#\d{1,5}\b", re.I | re.M)


def test_no_file_speaks_of_how_it_was_developed():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    hits = []
    for name in files:
        if name.startswith("tests/data/") or name.endswith((".png", ".json", ".jsonl")):
            continue
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        hits += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0).strip()}"
                 for m in PROCESS_WORDS.finditer(text)]
    assert not hits, hits
