"""The README and the pages under docs/: every relative link resolves, every anchor names a heading.

Plain text checks (no JAX import): a relative link `[text](path)` or `[text](path#anchor)` must name an existing
file, and an anchor (`#anchor` in the same file, or `page.md#anchor`) must be one GitHub generates for a heading
of the target file. Absolute links (http, https, mailto) are skipped. The README stays a front page: at most
250 lines, opening with the install+demo and the install+tests commands.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
# pages that predate the front page and do not open with a link back to the README
NO_BACK_LINK = {"method.md"}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) or ![alt](target), the text allowing one level of nested brackets, an optional "title"
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
SKIPPED_SCHEMES = ("http://", "https://", "mailto:")


def prose_lines(text):
    """The lines outside fenced code blocks, as (line number, line)."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def github_anchor(heading):
    """GitHub's anchor for a heading's text: markup dropped, lowercase, punctuation but - and _ removed, spaces to -."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)   # a link keeps its text
    text = INLINE_CODE.sub(lambda match: match.group(2), text)
    text = re.sub(r"<[^>]+>", "", text)                                            # inline HTML
    text = text.replace("*", "")
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor GitHub makes for the headings of a Markdown file, duplicates numbered -1, -2, ..."""
    seen = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = github_anchor(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path):
    """(line number, target) of every link outside code blocks and inline code."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            yield number, match.group(2)


def test_the_pages_exist():
    names = {page.name for page in PAGES}
    for name in ("README.md", "method.md", "models.md", "strategies.md", "evaluation.md", "benchmarks.md",
                 "embedded-models.md", "reliability.md", "architecture.md"):
        assert name in names, name


def test_anchor_rule():
    assert github_anchor("Qwen2.5-VL") == "qwen25-vl"
    assert github_anchor("On a GPU: `benchmarks/gpu_check.sh`") == "on-a-gpu-benchmarksgpu_checksh"
    assert github_anchor("Teaching it the zoom strategies' yes/no questions") == \
        "teaching-it-the-zoom-strategies-yesno-questions"
    assert github_anchor("Attention kernels: explicit vs fused (CPU)") == "attention-kernels-explicit-vs-fused-cpu"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    problems = []
    for number, target in links(page):
        if target.startswith(SKIPPED_SCHEMES):
            continue
        path_part, _, anchor = target.partition("#")
        destination = page if not path_part else (page.parent / path_part).resolve()
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not destination.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor:
            if destination.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(destination):
                problems.append(f"{where}: no heading of {destination.relative_to(ROOT)} has this anchor")
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 2
    assert "pip install" in blocks[0] and "vicrop-jax demo" in blocks[0]
    assert "pip install" in blocks[1] and "python -m pytest" in blocks[1]


@pytest.mark.parametrize("page", [page for page in PAGES[1:] if page.name not in NO_BACK_LINK],
                         ids=lambda page: page.name)
def test_docs_pages_open_with_a_link_back(page):
    head = page.read_text(encoding="utf-8").split("\n\n")[:2]   # the title and the one-line statement
    assert head[0].startswith("# ")
    assert "](../README.md)" in head[1]
