"""The documentation: the site builds (mkdocs --strict, API reference from the docstrings), the
README stays a short tutorial, and every relative link in README.md and docs/*.md leads to a
file of the repository (and, in the README, to a heading that exists)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300

# [text](target) and ![alt](target), target without spaces; an optional "title" after it
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(path: Path):
    """(line number, text) of the lines outside fenced code, with inline code removed."""
    in_fence = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, INLINE_CODE.sub("", line)


def relative_links(path: Path) -> list[tuple[int, str]]:
    links = []
    for number, line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            links.append((number, target))
    return links


def heading_anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as GitHub and the site (mkdocs.yml's toc
    slugify) make them."""
    from pymdownx.slugs import slugify

    slug = slugify(case="lower")
    anchors, seen = set(), {}
    for _, line in _heading_lines(path):
        base = slug(line, "-")
        count = seen.get(base, 0)
        anchors.add(base if count == 0 else f"{base}_{count}")
        seen[base] = count + 1
    return anchors


def _heading_lines(path: Path):
    in_fence = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not in_fence and match:
            yield number, match.group(1).replace("`", "")


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move reference material "
        f"to a page under docs/ and link it")


def broken_links(path: Path, root: Path = ROOT, check_anchors: bool = False) -> list[str]:
    broken = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.is_relative_to(root):
            broken.append(f"line {number}: {target} leaves the repository")
        elif not dest.exists():
            broken.append(f"line {number}: {target} (no such file)")
        elif check_anchors and anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
            broken.append(f"line {number}: {target} (no heading with anchor #{anchor})")
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(path):
    # anchors of links inside docs/ are checked by mkdocs (validation.anchors in mkdocs.yml)
    broken = broken_links(path, check_anchors=path == README)
    assert not broken, f"{path.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_link_checker_finds_broken_links(tmp_path):
    """The checker itself: it sees the README's links, and reports a missing file, a missing
    anchor and a link out of the folder, but not links in code or to web pages."""
    targets = [t for _, t in relative_links(README)]
    assert "docs/ENGINE.md" in targets and "docs/RESULTS.md" in targets
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "A.md").write_text("# A\n\n## Exit codes\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](docs/A.md#exit-codes) [web](https://example.org/x.md) `[code](nope.md)`\n"
                    "```\n[fenced](nope.md)\n```\n"
                    "[missing](docs/B.md) [anchor](docs/A.md#no-such) [out](../elsewhere.md)\n")
    assert broken_links(page, root=tmp_path, check_anchors=True) == [
        "line 5: docs/B.md (no such file)",
        "line 5: docs/A.md#no-such (no heading with anchor #no-such)",
        "line 5: ../elsewhere.md leaves the repository",
    ]


def test_site_builds_strict(tmp_path):
    """mkdocs build --strict: every nav page exists, every docs link and anchor resolves, and
    mkdocstrings renders the API reference without a docstring warning."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("deepzero_oracle.oracle.CallableOracle", "deepzero_oracle.train.Trainer",
                 "deepzero_oracle.estimators.CGE", "deepzero_oracle.server.serve_blackbox",
                 "adapters.sol.oracle.SOLOracle"):
        assert f'id="{name}"' in api, f"the API reference lacks {name}"
