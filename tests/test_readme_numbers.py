"""Numbers in README.md come from the code that ships (issue #29 item 6).

A number the README quotes from a command's output is compared here with what the command prints
now; the README quotes no figure that no test checks. The demo's accuracies are not quoted (they
move by a test image with the CPU's kernels and with every change to the training code); the "Use"
section's accuracies are what ``python tests/test_readme_lr.py`` prints, within one test image."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _paragraph(section: str, starts: str) -> str:
    return next(p for p in _section(section).split("\n\n") if p.startswith(starts))


def test_use_accuracies_are_what_the_script_prints():
    pytest.importorskip("sklearn")
    import test_readme_lr as lr  # the script the README names: python tests/test_readme_lr.py

    text = _paragraph("Use", "`tests/test_readme_lr.py` runs this block")
    quoted = [(float(a), float(b)) for a, b in re.findall(r"(\d+\.\d)-(\d+\.\d)%", text)]
    # in the README's order: its block, SGD with lr = 0.1*B/256, that lr on LARS, LARC's clip with it
    runs = [lr.run_readme, lambda s: lr.run_with(lr.sgd, s), lambda s: lr.run_with(lr.old_advice, s),
            lambda s: lr.run_with(lr.larc_keeps_sgd_lr, s)]  # fmt: skip
    assert len(quoted) == len(runs), text
    one_image = 100 / len(lr.load_digits()[3])  # 360 test images: 0.28 points
    for (lo, hi), run in zip(quoted, runs):
        acc = [100 * run(seed) for seed in range(3)]  # the script's 3 seeds
        assert min(acc) == pytest.approx(lo, abs=one_image) and max(acc) == pytest.approx(hi, abs=one_image), (
            f"README says {lo}-{hi}%, python tests/test_readme_lr.py prints {[round(a, 1) for a in acc]}"
        )


def test_demo_paragraph_quotes_no_accuracy_and_its_facts_are_the_demo_s():
    pytest.importorskip("sklearn")
    from fusedlars.tools import demo

    text = " ".join(_paragraph("Seeing training: stats, schedules, demo", "`fusedlars demo`").split())
    target = f"steps to {demo.DemoConfig().target:.0%}"  # the demo's target, a setting
    assert target in text
    assert not re.search(r"\d%", text.replace(target, "")), "the README quotes a demo accuracy no test checks"
    x_tr, _, x_te, _ = demo.load_digits()
    assert f"{len(x_tr)} training / {len(x_te)} test" in text
    assert f"batch size {demo.DemoConfig().batch_size}" in text


def test_bench_shape_counts_are_the_shape_set_s():
    from fusedlars.tools.shapes import SHAPE_SETS, count_params

    shp = SHAPE_SETS["resnet50"]()
    assert f"ResNet-50's {len(shp)} parameter tensors ({count_params(shp):,} params)" in _section("Numbers")
