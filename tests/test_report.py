"""The HTML report of a synthetic run: self-contained, escaped, and rendered by a real browser.

Run: ``.venv/bin/pytest tests/test_report.py -q`` (about 10 s; the browser test needs /usr/bin/chromium,
which CI installs, and is skipped with a reason where it is missing).

Checks that ``write_report`` draws missing figures, embeds every PNG as a data URI, loads nothing from the
network, says when Fashion-MNIST stood in for MNIST, lists one verdict row per group, escapes a group
named ``<script>…``, lists the group coverage and unassigned keys; then that headless Chromium renders
the page into a screenshot that is not blank and shows the heatmaps' colours (so the images decoded).
"""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from criticality.errors import CriticalityError
from criticality.output import report

sys.path.insert(0, str(Path(__file__).parent))
from test_plots import write_run  # noqa: E402  (the synthetic run directory is shared with the plot tests)

CHROMIUM = Path("/usr/bin/chromium")
EVIL = "<script>alert(1)</script>"
GROUPS = ["fc1", EVIL, "fc3"]


class _Tables(HTMLParser):
    """Cell texts of every row of every ``<table id=...>``: {id: [[cell, ...], ...]}."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._id = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._id = dict(attrs).get("id")
            self.tables[self._id] = []
        elif tag == "tr" and self._id:
            self.tables[self._id].append([])
        elif tag in ("td", "th") and self._id and self.tables[self._id]:
            self.tables[self._id][-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._id = None

    def handle_data(self, data):
        if self._id and self.tables[self._id] and self.tables[self._id][-1]:
            self.tables[self._id][-1][-1] += data


@pytest.fixture(scope="module")
def run_report(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    write_run(run, group_names=GROUPS)
    path = report.write_report(run)
    return run, path, path.read_text(encoding="utf-8")


def test_report_written_and_figures_drawn(run_report):
    run, path, _ = run_report
    assert path == run / "report.html"
    assert (run / "figures" / "robustness_error.png").is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no leftover temp files


def test_report_is_self_contained(run_report):
    _, _, text = run_report
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert "<script" not in text.lower()  # no JS at all, and the evil group name is escaped
    assert text.count('src="data:image/png;base64,') == 8  # error, joint, loss, 5 distances


def test_report_content(run_report):
    _, _, text = run_report
    assert "This run used Fashion-MNIST as a stand-in for MNIST" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<title>Layer criticality: fcn3 on Fashion-MNIST</title>" in text
    parser = _Tables()
    parser.feed(text)
    verdicts = parser.tables["verdicts"][1:]
    assert [r[0] for r in verdicts] == [*GROUPS, f"{EVIL}+fc3"]
    assert [r[2] for r in verdicts] == ["critical"] * 4
    assert verdicts[0][1] == "+0.500" and verdicts[0][3] == "0.820"
    assert "≤ 0.020" in text  # the threshold is stated
    coverage = dict(parser.tables["coverage"][1:])
    assert coverage["fc1"] == "fc1.weight, fc1.bias" and coverage[EVIL] == f"{EVIL}.weight, {EVIL}.bias"
    assert "head.scale" in text
    config = dict(parser.tables["config"])
    assert config["init"] == "glorot" and config["git_commit"] == "abc1234"
    assert dict(parser.tables["provenance"])["torch"] == "2.6.0"


def test_report_without_stand_in(tmp_path):
    write_run(tmp_path, stands_in_for=None)
    text = report.write_report(tmp_path, out=tmp_path / "other" / "r.html").read_text(encoding="utf-8")
    assert "stand-in" not in text and "Fashion-MNIST" in text


def test_report_needs_analysis(tmp_path):
    with pytest.raises(CriticalityError, match="no analysis summary"):
        report.write_report(tmp_path)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (CI installs Debian chromium)")
def test_report_renders_in_chromium(run_report, tmp_path):
    _, path, _ = run_report
    shot = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        path.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=float)  # (2000, 1280, 3)
    assert rgb.shape == (2000, 1280, 3)
    assert rgb.std() > 20  # not blank
    # Only the embedded heatmaps bring large areas of saturated viridis colour: the CSS is grey,
    # apart from thin verdict text and a pale stand-in banner.
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    assert (saturation > 80).sum() > 50_000, "no heatmap colours on the page: images did not render"
    viridis_purple = np.abs(rgb - [68, 1, 84]).max(axis=2) < 40  # the low end of the colour scale
    assert viridis_purple.sum() > 5_000
