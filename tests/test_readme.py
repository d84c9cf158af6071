"""The README stays a front page: small, the two commands first, every link alive."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = (
    "exactly-once",
    "wire-formats",
    "scaler",
    "compose",
    "loadtest",
    "benchmarks",
    "reliability",
)


def test_readme_is_under_12_kb() -> None:
    assert README.stat().st_size < 12 * 1024


def test_readme_opens_with_the_main_job_and_the_ci_test_command() -> None:
    first_block = README.read_text().split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line]
    assert commands[0] == "bash .ci/install.sh && .venv/bin/tickscale up"
    ci_tests = re.search(r"^(\.venv/bin/pytest[^|\n]*?) \|\|", (ROOT / ".ci/run").read_text(), re.M)
    assert ci_tests is not None
    assert commands[1] == f"bash .ci/install.sh && {ci_tests.group(1)}"


def test_readme_links_every_doc_and_every_relative_link_resolves() -> None:
    text = README.read_text()
    for name in DOCS:
        assert f"(docs/{name}.md)" in text, name
    for md in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", md.read_text()):
            if "://" not in target:
                assert (md.parent / target).exists(), f"{md.name}: {target}"
