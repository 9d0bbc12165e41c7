"""The README's install section (issue #29 item 2): the light install comes first (torch, then the
package and nothing else), the extras after it, and the full set-up is two commands that .ci/run
runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _bash_blocks(text: str) -> list[list[str]]:
    return [[ln for ln in b.splitlines() if ln.strip()] for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_first_install_line_is_the_light_one():
    readme = (ROOT / "README.md").read_text()
    first = _bash_blocks(readme)[0]  # the README's first commands
    assert first == ["pip install torch==2.13.0", "pip install --no-build-isolation ."], first
    assert _bash_blocks(_section("Install"))[0] == first


def test_full_setup_is_two_commands_that_ci_runs():
    full = _bash_blocks(_section("Install"))[1]
    assert len(full) == 2, full
    install, test = full
    assert install.startswith("pip install torch==2.13.0 && ")
    assert '".[test,triton,bench,demo]"' in install and test == "python -m pytest -q"
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci and test in ci
    assert ci.index(install) < ci.index(test)


def test_extras_named_in_the_readme_exist():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set(re.findall(r"`\[(\w+)\]`", _section("Install")))
    assert named == {"bench", "demo", "test", "triton"} and named <= set(extras)
