"""benches/allocation_quality.py's schedules and benches/owl_profile.py's cross-check with the core."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
from allocation_quality import compose, parse_runs  # noqa: E402


def test_schedules_keep_the_mean_and_their_shape():
    ramp = compose("ramp:0.08", 0.7, 30, None)
    assert ramp[0] == pytest.approx(0.62) and ramp[-1] == pytest.approx(0.78)
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    assert sum(ramp) / 30 == pytest.approx(0.7)

    first = compose("first:0.3", 0.7, 30, None)
    assert first[0] == 0.3 and first[1:] == pytest.approx([(21 - 0.3) / 29] * 29)

    both = compose("ramp:0.08+first:0.7", 0.7, 30, None)
    assert both[0] == 0.7 and sum(both) / 30 == pytest.approx(0.7)
    ratios = [b / r for b, r in zip(both[1:], ramp[1:])]
    assert ratios == pytest.approx([ratios[0]] * 29), "the other blocks keep the ramp's proportions"

    owl = [0.6, 0.75, 0.8, 0.65]
    assert compose("reverse-owl", 0.7, 4, owl) == pytest.approx([0.8, 0.65, 0.6, 0.75])
    assert compose("owl+first:0.5", 0.7, 4, owl)[0] == 0.5
    assert compose("uniform", 0.5, 3, None) == [0.5] * 3


@pytest.mark.parametrize("spec", ["wanda@0.7", "wanda@0.7/ramp", "wanda@0.7/first", "magnitude@0.5/uniform", "wanda@0.7/owl:3", "wanda@/uniform"])
def test_bad_run_specs_are_refused(spec):
    with pytest.raises(SystemExit):
        parse_runs(spec)


def test_a_schedule_outside_the_unit_interval_is_refused():
    with pytest.raises(SystemExit):
        compose("ramp:0.4", 0.7, 30, None)


@pytest.mark.slow
def test_owl_profile_agrees_with_apply(gram_model):
    """The bench's numpy outlier ratios give the block sparsities `apply --allocation owl` reports
    (it exits 1 otherwise), on a real (tiny) checkpoint and its sidecar."""
    proc = subprocess.run([sys.executable, str(ROOT / "benches" / "owl_profile.py"), "--model-dir", str(gram_model), "--sparsity", "0.5"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(rows) == 2 and "mlp.down_proj" in proc.stdout, proc.stdout
