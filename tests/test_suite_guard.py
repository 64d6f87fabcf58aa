"""The CI guard of tests/conftest.py: under CRITICALITY_REQUIRE_DATA=1 a skip that is not on the allowlist fails,
at collection time (a library module that no longer imports) as at run time; without it, skips stay skips.
Run: ``pytest -q tests/test_suite_guard.py`` (a few seconds: it runs pytest on two probe files)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROBES = {
    "test_collect.py": ('import pytest\npytest.importorskip("criticality.no_such_module")\n\n\n'
                        'def test_x():\n    pass\n'),
    "test_run.py": ('import pytest\n\n\n@pytest.mark.skipif(True, reason="root writes into read-only directories")\n'
                    'def test_allowed():\n    pass\n\n\n'
                    'def test_missing():\n    pytest.skip("transformers is missing")\n'),
}


def _pytest(folder: Path, probe: str, required: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CRITICALITY_REQUIRE_DATA"}
    if required:
        env["CRITICALITY_REQUIRE_DATA"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", probe], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=120)


def test_unlisted_skips_fail_under_ci_and_stay_skips_otherwise(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    for name, text in PROBES.items():
        (tmp_path / name).write_text(text)
    collect = _pytest(tmp_path, "test_collect.py", required=True)
    assert collect.returncode != 0 and "not on the allowlist" in collect.stdout
    run = _pytest(tmp_path, "test_run.py", required=True)
    assert run.returncode == 1 and "1 failed, 1 skipped" in run.stdout
    for probe, skipped, code in (("test_collect.py", "1 skipped", 5), ("test_run.py", "2 skipped", 0)):
        plain = _pytest(tmp_path, probe, required=False)  # 5: pytest collected no test (the file was skipped)
        assert plain.returncode == code and skipped in plain.stdout
