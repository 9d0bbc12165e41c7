"""examples/timm_factory.py run as a user runs it: ``python examples/timm_factory.py`` (issue #29 item 3).

With timm's files installed as the README and CI install them (``pip install --no-deps
"timm==1.0.31"``: no torchvision, or PyPI's, which does not import beside a CPU torch) the example
trains with every name it registers; without timm it stops with the install line, not a traceback."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "timm_factory.py"

# hides timm from the interpreter, as on a machine where it is not installed
HIDE_TIMM = """
import importlib.abc, runpy, sys
class HideTimm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "timm" or name.startswith("timm."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, HideTimm())
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_timm_example_runs_as_written():
    if importlib.util.find_spec("timm") is None:
        pytest.skip('timm is not installed: pip install --no-deps "timm==1.0.31" (README, Install)')
    proc = _run(str(EXAMPLE))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["fusedlars", "fusedlarslarc", "fusedlarslamb", "fusedlarstvlars"]
    for ln in lines:
        assert "fusedlars.compat.timm." in ln, ln
        first, last = (float(x) for x in ln.rsplit("loss ", 1)[1].split(" -> "))
        assert last < first, ln  # it trained


def test_timm_example_without_timm_says_how_to_install_it():
    proc = _run("-c", HIDE_TIMM, str(EXAMPLE))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    msg = proc.stderr
    assert "needs timm, which is not installed" in msg and 'pip install --no-deps "timm==1.0.31"' in msg, msg
    assert "pip install timm" in msg


def test_readme_and_ci_install_timm_the_way_the_example_runs():
    line = 'pip install --no-deps "timm==1.0.31"'
    readme = (ROOT / "README.md").read_text()
    assert "python examples/timm_factory.py" in readme and line in readme.split("python examples/timm_factory.py")[1]
    assert line in (ROOT / ".ci" / "run").read_text()
    assert line in EXAMPLE.read_text() and line in (ROOT / "docs" / "install.md").read_text()
