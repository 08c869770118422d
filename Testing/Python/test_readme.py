"""The README is a user's guide: short, its links lead somewhere, and its tutorial runs.

The tutorial is the block between ``<!-- tutorial:start -->`` and ``<!-- tutorial:end -->``;
every ``uv run --frozen nodulemtl ...`` line in it is run here, in order, in a scratch folder
that sees the repository's ``Resources/`` (the sample CT), with this environment's
``nodulemtl`` entry point, and must exit 0 and write what the tutorial says it writes.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
#: Where the long sections of the former README went; the README must link each one.
MOVED = ("docs/cli.md", "docs/methods.md", "docs/slicer.md", "training/README.md", "CONTRIBUTING.md",
         "training/RESULTS.md")


def _text() -> str:
    return README.read_text(encoding="utf-8")


def tutorial_commands(text: str) -> list[list[str]]:
    """The ``uv run --frozen nodulemtl ...`` lines of the README's tutorial block, as argv lists
    without the ``uv run --frozen`` prefix.

    Raises:
        AssertionError: no tutorial block, or a block without commands.
    """
    m = re.search(r"<!-- tutorial:start -->(.*?)<!-- tutorial:end -->", text, re.S)
    assert m, "README has no tutorial block"
    cmds = []
    for line in m.group(1).splitlines():
        line = line.strip()
        if line.startswith("uv run --frozen nodulemtl "):
            cmds.append(shlex.split(line)[4:])
    assert cmds, "the tutorial block holds no 'uv run --frozen nodulemtl' command"
    return cmds


def test_readme_is_short_and_links_every_moved_section():
    text = _text()
    assert len(text.splitlines()) <= 250
    for target in MOVED:
        assert f"]({target}" in text, f"README does not link {target}"
        assert (REPO / target).is_file(), target
    # Every relative link of the README and the docs leads to an existing file.
    for doc in [README, *sorted((REPO / "docs").glob("*.md")), REPO / "CONTRIBUTING.md", REPO / "training" / "README.md"]:
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" in link or link.startswith("mailto:"):
                continue
            assert (doc.parent / link).exists(), f"{doc.relative_to(REPO)} links a missing file: {link}"


def test_readme_gives_the_two_setup_commands_that_ci_runs():
    text = _text()
    assert "pip install uv && uv run --frozen pytest" in text
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "\nuv run --frozen pytest\n" in ci


@pytest.mark.slow
def test_readme_tutorial_runs(tmp_path):
    nodulemtl = Path(sys.executable).parent / "nodulemtl"
    if not nodulemtl.exists():
        pytest.skip(f"the nodulemtl entry point is not installed beside {sys.executable}")
    (tmp_path / "Resources").symlink_to(REPO / "Resources")
    for argv in tutorial_commands(_text()):
        proc = subprocess.run([str(nodulemtl), *argv, "--quiet"] if argv[0] != "--version" else [str(nodulemtl), *argv],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout}\n{proc.stderr}"
        if "--out" in argv:
            out = tmp_path / argv[argv.index("--out") + 1]
            assert (out / "nodules.json").is_file(), f"{' '.join(argv)} wrote no nodules.json"
