"""The README's quick start as `make` runs it: `make serve` installs the engine alone, `make test` adds
the test and dev tools.

`make -n` prints the commands a target would run without running them, so these tests read the real Makefile's
plan for a venv that does not exist yet (a fresh machine)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def plan(target: str, tmp_path: Path) -> list[str]:
    # As a person runs it: not a sub-make of `make test` (whose MAKEFLAGS and MAKELEVEL would be inherited).
    inherited = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.splitlines()


def installs(lines: list[str]) -> list[str]:
    return [line for line in lines if "pip install" in line and "--upgrade pip" not in line]


def test_make_serve_installs_the_engine_alone_and_says_so(tmp_path: Path) -> None:
    lines = plan("serve", tmp_path)
    assert [line.split("pip install", 1)[1].split() for line in installs(lines)] == [
        ["--progress-bar", "off", "-e", "."]
    ]
    assert not any("--quiet" in line for line in installs(lines)), "a fresh install must show its progress"
    assert any(line.startswith("echo") and "installing the engine" in line for line in lines)
    assert lines[-1].endswith("pricer serve")


def test_make_test_adds_the_test_and_dev_extras(tmp_path: Path) -> None:
    pip_lines = installs(plan("test", tmp_path))
    assert any(line.rstrip().endswith("-e .") for line in pip_lines)
    assert any("'.[test,dev]'" in line for line in pip_lines)


def test_the_readme_curl_lines_use_the_address_the_engine_wrote() -> None:
    """A second engine on PORT=8001 writes PRICER_URL=http://127.0.0.1:8001 into .demo-keys.env: the README's
    curl lines must follow it, not a hard-coded port."""
    text = README.read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    curls = [line for line in quick_start.splitlines() if "curl" in line or line.strip().startswith("http")]
    assert curls
    assert not any(re.search(r"127\.0\.0\.1:8000/(api|health)", line) for line in curls), curls
    assert "PORT=" in quick_start


def test_the_load_tester_names_the_keys_file_the_engine_writes() -> None:
    doc = (ROOT / "benchmarks" / "loadtest.py").read_text(encoding="utf-8").split('"""', 2)[1]
    assert "--keys-file .demo-keys.env" in doc
    assert " demo-keys.env" not in doc
    assert ".venv/bin/python benchmarks/loadtest.py" in doc
