"""The README and the pages under docs/ say only what is true: every shell command in them parses
(the `curator-assets` verbs with the real argument parser, Dagster's commands with their own
`--help`, scripts with `bash -n`), every file they copy or link exists, every Python example
compiles, and the README stays a newcomer's page."""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from curator_assets.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
DAGSTER_TOOLS = {"dagster", "dagster-daemon", "dagster-webserver", "dg", "dagster-celery"}


def _blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def _commands(page: Path) -> list[list[str]]:
    """Each simple command of the page's bash blocks, as argv (environment assignments and
    `.venv/bin/` dropped; `&&` chains split)."""
    out = []
    for block in _blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            for part in re.split(r"&&|\|\|", line):
                argv = shlex.split(part.strip().strip("()"), comments=True)
                while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                    argv = argv[1:]
                if argv:
                    argv[0] = argv[0].removeprefix(".venv/bin/")
                    out.append(argv)
    return out


ALL = [(page, argv) for page in PAGES for argv in _commands(page)]


def test_the_pages_have_commands_to_check() -> None:
    assert len([a for _, a in ALL if a[0] == "curator-assets"]) >= 8
    assert any(a[:2] == ["bash", "scripts/test.sh"] for _, a in ALL)


@functools.cache
def _help(exe: str, sub: tuple[str, ...]) -> tuple[int, str]:
    """``exe SUB --help`` once per test process (each start imports Dagster: seconds of CPU)."""
    done = subprocess.run([exe, *sub, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    return done.returncode, done.stderr


@pytest.mark.parametrize(("page", "argv"), ALL, ids=[f"{p.name}:{' '.join(a)[:60]}" for p, a in ALL])
def test_every_command_parses(page: Path, argv: list[str], tmp_path: Path) -> None:
    tool = argv[0]
    if tool == "curator-assets":
        args = build_parser().parse_args(argv[1:])  # exits (a SystemExit: a failure) on a wrong option
        assert callable(args.func)
    elif tool in DAGSTER_TOOLS:
        exe = BIN / tool
        assert exe.exists(), f"{page.name}: {tool} is not installed by the project's dependencies"
        sub = tuple(a for a in argv[1:2] if not a.startswith("-"))
        returncode, stderr = _help(str(exe), sub)
        assert returncode == 0, f"{page.name}: `{' '.join(argv)}`: {stderr[-500:]}"
    elif tool == "bash":
        script = REPO / argv[1]
        assert script.is_file(), f"{page.name}: no {argv[1]}"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    elif tool == "cp":
        sources = [a for a in argv[1:-1] if not a.startswith("-")]
        assert sources and all((REPO / s).exists() for s in sources), f"{page.name}: {argv}"
    elif tool in ("python3", "python"):
        assert argv[1:3] == ["-m", "venv"] or (REPO / argv[1]).exists(), f"{page.name}: {argv}"
    elif tool in ("export", "cd", "kubectl", "helm"):
        pass  # shell built-ins; the cluster's own tools (deploy/k8s is checked by test_executors.py)
    else:  # a system tool the set-up installs (scripts/test.sh): it must be there
        name = Path(tool).name
        found = shutil.which(name) or list(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
        assert found, f"{page.name}: `{' '.join(argv)}`: {name} is not installed (scripts/test.sh installs the tools)"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_and_python_examples(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    for code in _blocks(page, "python"):
        compile(code, str(page), "exec")


def test_readme_is_a_newcomers_page() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    setup = text.split("## ", 2)[1]  # the first section holds the two set-up commands
    commands = _blocks(REPO / "README.md", "bash")[:2]
    assert all(c.strip() in setup for c in commands)
    assert "curator-assets demo demo_data" in commands[0] and "curator-assets run demo_data" in commands[0]
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1].strip() in ci, ".ci/run must run the README's test command"
    for page in PAGES[1:]:
        lines = [line for line in page.read_text().splitlines() if line.strip()]
        assert lines[0].startswith("# ") and len(lines) > 2, page.name  # a title, then what it is for
