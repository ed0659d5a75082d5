"""The README and the docs pages: their Python blocks that build a model run as written, their local links
resolve, and the README stays a short front page that links every docs page."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))  # the topic pages; docs/results/ has its own owner
PAGES = [README, *DOCS]


def _python_blocks(page):
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


BLOCKS = [(f"{page.relative_to(ROOT)} python block {index}", block)
          for page in PAGES for index, block in enumerate(_python_blocks(page)) if "build_model(" in block]


def test_the_pages_have_their_model_blocks():
    assert sorted(name.split()[0] for name, _ in BLOCKS) == ["docs/models.md", "docs/nas.md"]


@pytest.mark.slow
@pytest.mark.parametrize("name,block", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_model_block_runs_as_written(name, block):
    namespace = {}
    exec(compile(block, name, "exec"), namespace)
    assert set(namespace["outputs"].main) >= {"segmentation", "depth"}


def test_the_readme_is_a_short_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300
    assert lines.count("## Results") == 1


def test_the_readme_links_every_docs_page():
    text = README.read_text()
    missing = [page.name for page in DOCS if f"](docs/{page.name})" not in text]
    assert not missing


def _anchors(page):
    """GitHub's heading anchors of a page (headings inside fenced blocks are not headings)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_local_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken
