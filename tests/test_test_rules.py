"""The rules the tests themselves follow: a skip for a missing data set,
package or network is a failure under ``CI=true``; the quick subset starts no
Ray and no DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import assert_loss_falls, import_or_skip, in_ci, skip_or_fail


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_outside_ci_a_missing_thing_is_a_skip(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="SciFact not found at /nowhere"):
        skip_or_fail("SciFact not found at /nowhere")
    with pytest.raises(pytest.skip.Exception, match=r"no_such_mod_zz.*pip install zz"):
        import_or_skip("no_such_mod_zz", "pip install zz")


@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_under_ci_a_missing_thing_fails_saying_what_is_missing(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="SciFact not found at /nowhere.*CI=true"):
        skip_or_fail("SciFact not found at /nowhere")
    with pytest.raises(pytest.fail.Exception, match=r"no_such_mod_zz.*pip install zz"):
        import_or_skip("no_such_mod_zz", "pip install zz")
    # What is installed is simply returned.
    assert import_or_skip("json", "-") is json


def test_the_loss_falls_by_a_margin():
    assert_loss_falls([2.0, 2.0, 2.0, 1.5, 1.0, 1.0, 1.0], by=0.4)
    with pytest.raises(AssertionError, match="loss fell"):
        assert_loss_falls([2.0, 2.0, 2.0, 1.9, 1.95, 1.9, 1.9], by=0.1)  # a wobble


_QUICK_TESTS = """
import pytest

def test_uses_ray_local(ray_local):
    pass

def test_inits_ray():
    import ray
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

def test_ray_in_a_subprocess():
    import subprocess, sys
    code = "import ray; ray.init(num_cpus=1, include_dashboard=False); ray.shutdown()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)

def test_imports_deepspeed():
    import deepspeed  # noqa: F401

@pytest.mark.slow
def test_slow_may_import_deepspeed():
    import deepspeed  # noqa: F401

def test_plain():
    pass
"""


@pytest.mark.slow  # starts Ray and imports DeepSpeed on purpose, in a child pytest
def test_the_quick_subset_guard_fails_tests_that_start_ray_or_deepspeed(pytester, monkeypatch):
    """The guard in conftest.py: each way to start Ray or DeepSpeed in a test
    not marked slow is an error; a slow test and a plain one pass."""
    repo = Path(__file__).resolve().parents[1]
    pytester.makeconftest((repo / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_quick=_QUICK_TESTS)
    monkeypatch.setenv("PYTHONPATH", str(repo))  # the conftest imports tests.helpers
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-W", "ignore")
    out = res.stdout.str()
    res.assert_outcomes(passed=5, errors=4)  # an error at teardown keeps its pass
    assert "test_uses_ray_local uses the ray_local fixture" in out
    assert "test_inits_ray started Ray (in the test process)" in out
    assert "test_ray_in_a_subprocess started a Ray cluster (in a subprocess)" in out
    assert "test_imports_deepspeed started DeepSpeed (imported)" in out
