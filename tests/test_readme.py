"""Every ```python block of README.md and docs/*.md runs as written (CPU, small sizes), and the
README's own CPU install gives every package its blocks import; no file speaks of how the code was
developed."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from importlib import metadata
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


def readme_cpu_install() -> list[str]:
    """The requirements of the README's first install block (the CPU route): the packages its pip
    lines name, with this package's install_requires and the extras it names read from setup.py."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^## Install\n.*?^```bash\n(.*?)^```$", text, re.S | re.M).group(1)
    call = next(node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text(encoding="utf-8")))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    setup = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
             if kw.arg in ("install_requires", "extras_require")}
    wanted = []
    for line in block.splitlines():
        words = shlex.split(line.split("#")[0])
        assert words[:2] == ["pip", "install"], line
        args = [w for i, w in enumerate(words[2:], 2) if not w.startswith("-") and not words[i - 1].startswith("--")]
        for arg in args:
            this = re.fullmatch(r"\.(?:\[(.*)\])?", arg)
            if this is None:
                wanted.append(arg)
                continue
            wanted += setup["install_requires"]
            for extra in filter(None, (this.group(1) or "").split(",")):
                wanted += setup["extras_require"][extra]
    return wanted


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_closure(requirements: list[str]) -> set[str]:
    """The installed distributions that these requirements pull in, transitively (normalized names)."""
    from packaging.requirements import Requirement
    seen, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        if norm(req.name) in seen:
            continue
        seen.add(norm(req.name))
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(sub)
    return seen


WITHOUT = """
import json, sys
absent, imports = json.load(sys.stdin)

class Absent:   # as if these distributions were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in absent:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
for statement in imports:
    exec(statement, {})
"""


def test_the_readmes_cpu_install_gives_what_its_blocks_import():
    """The README's python blocks import (and what they import imports in turn, e.g. absl under
    Pallas's Mosaic GPU) with only the distributions that the README's CPU install brings: every
    other installed one, such as the test extra's, is hidden."""
    installed = installed_closure(readme_cpu_install()) | {"gateloop-hybrid"}
    absent = sorted(module for module, dists in metadata.packages_distributions().items()
                    if not any(norm(dist) in installed for dist in dists))
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    imports = [ast.unparse(node) for m in BLOCK.finditer(text) for node in ast.walk(ast.parse(m.group(1)))
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    proc = subprocess.run([sys.executable, "-c", WITHOUT], input=json.dumps([absent, imports]), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


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
