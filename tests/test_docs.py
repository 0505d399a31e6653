"""The README stays a short front door, and the docs speak of kd as it is (no development journal).

The dated history of measurements belongs in benchmarks/RESULTS.md, which these checks leave out.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 200

#: Words of a development journal: they date the text, and a reader of today cannot place them.
JOURNAL_WORDS = re.compile(r"this round|previous release|last round|previous round", re.IGNORECASE)
#: A bare commit hash: 7 to 40 hex digits (at least one a digit, so a word such as "defaced" passes), then " (",
#: or after "commit ".
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])[0-9a-f]{7,40} \(|\bcommit [0-9a-f]{7,40}\b", re.IGNORECASE)


def user_texts() -> list[Path]:
    return [README, *sorted(DOCS.glob("**/*.md"))]


def journal_lines(text: str) -> list[str]:
    """The lines of `text` that read as a development journal."""
    return [line for line in text.splitlines() if JOURNAL_WORDS.search(line) or COMMIT_HASH.search(line)]


def nav_pages(nav: list) -> list[str]:
    """Every page file named in mkdocs.yml's nav, at any depth."""
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += nav_pages(value)
        elif not str(value).startswith(("http://", "https://")):
            pages.append(str(value))
    return pages


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep at most {README_MAX_LINES}, the rest in docs/"


@pytest.mark.parametrize("path", user_texts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_journal_words(path: Path) -> None:
    found = journal_lines(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(ROOT)} reads as a journal (dated notes go to benchmarks/RESULTS.md): {found}"


@pytest.mark.parametrize(
    "line",
    [
        "measured on this round's main",
        "the previous release took 48 s",
        "as in the last round",
        "measured at commit 5741029",
        "the student at 5741029 (when it started at 91.11%)",
    ],
)
def test_journal_check_finds(line: str) -> None:
    assert journal_lines(line) == [line]


@pytest.mark.parametrize(
    "line",
    [
        "`timm:test_resnet` 1f1311d1af65 → 1f1311d1af65",  # a fingerprint in an example output
        "CRD Table 1 (128-d, 16384 negatives)",  # a plain number before a parenthesis
        "the label effaced (a word of hex letters only)",
    ],
)
def test_journal_check_leaves(line: str) -> None:
    assert journal_lines(line) == []


def test_every_nav_page_exists() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    pages = nav_pages(config["nav"])
    assert pages, "mkdocs.yml has no nav"
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that docs/ does not have: {missing}"


#: A repository file named in the text: a test, a kd module, a config, an example or a benchmark.
REPO_PATH = re.compile(r"\b(?:tests|kd|conf|examples|benchmarks)/[\w/]+\.(?:py|yaml|md)\b")


def test_named_files_exist() -> None:
    named = {(path.name, found) for path in user_texts() for found in REPO_PATH.findall(path.read_text("utf-8"))}
    missing = sorted(f"{page}: {found}" for page, found in named if not (ROOT / found).is_file())
    assert not missing, f"the docs name files the repository does not have: {missing}"
