"""Figures from synthetic analysis tables: layout, colour limits, files on disk.

Run: ``.venv/bin/pytest tests/test_plots.py -q`` (a few seconds, no GPU, no data).

Checks that the robustness heatmap puts ``rand`` first, checkpoints ascending, ``final`` last, single
groups before joint ones (marked ``*``); that its numbers equal means computed here from the raw table;
that NaN/inf cells are annotated; that > 8 groups transpose; that colour limits follow ``vmax``; that
saved PNGs have the expected pixel size and are not blank; that :func:`draw_run` writes every figure
from a synthetic run directory; and that bad input raises :class:`CriticalityError`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from criticality.errors import CriticalityError
from criticality.infra.files import write_json
from criticality.output import figures as plots

SINGLES = ["fc1", "fc2", "fc3"]
JOINT = "fc2+fc3"
CHECKPOINTS = [0, 1, 2, 3, 5]  # 5 = final epoch
SEEDS = [0, 1, 2]
FINAL_ERROR, FINAL_LOSS = 0.10, 0.30


def make_cells(singles=SINGLES, joint=(JOINT,), final_epoch=5) -> pd.DataFrame:
    """A cells table in the analysis schema: one NaN error (fc3 @ 1) and one inf loss (fc1 seed 2)."""
    rows = [
        dict(op="final", group="", joint=False, checkpoint=final_epoch, seed=pd.NA, error=FINAL_ERROR, loss=FINAL_LOSS)
    ]
    for k, g in enumerate([*singles, *joint]):
        is_joint = g in joint
        for s in SEEDS:
            rows.append(
                dict(
                    op="rerandomize",
                    group=g,
                    joint=is_joint,
                    checkpoint=pd.NA,
                    seed=s,
                    error=0.80 + 0.01 * k + 0.02 * s,
                    loss=2.0 + s,
                )
            )
        for c in CHECKPOINTS:
            err = FINAL_ERROR + (0.5 / (k + 1)) / (1 + c)
            rows.append(dict(op="reinit", group=g, joint=is_joint, checkpoint=c, seed=pd.NA, error=err, loss=3 * err))
    df = pd.DataFrame(rows)
    df.loc[(df.group == "fc3") & (df.checkpoint == 1), "error"] = np.nan
    df.loc[(df.group == "fc1") & (df.seed == 2), "loss"] = np.inf
    df["checkpoint"] = df["checkpoint"].astype("Int64")
    df["seed"] = df["seed"].astype("Int64")
    df["n"] = 1000
    df["delta_error"] = df["error"] - FINAL_ERROR
    df["delta_loss"] = df["loss"] - FINAL_LOSS
    df["finite"] = np.isfinite(df["error"]) & np.isfinite(df["loss"])
    return df


def make_distances(groups=(*SINGLES, JOINT)) -> pd.DataFrame:
    rows = [
        dict(group=g, checkpoint=c, l2=0.1 * k * c, linf=0.2 * k * c, l2_rel=0.3 * k * c, linf_rel=0.4 * k * c,
             cosine=0.01 * k * c)
        for k, g in enumerate(groups, 1)
        for c in CHECKPOINTS
    ]
    return pd.DataFrame(rows)


def write_run(run, group_names=None, stands_in_for="mnist") -> None:
    """A finished run directory: config.json and analysis/{cells,distances}.csv, summary.json."""
    singles = group_names or SINGLES
    joint = "+".join(singles[1:])
    cells = make_cells(singles, (joint,))
    (run / "analysis").mkdir(parents=True)
    cells.to_csv(run / "analysis" / "cells.csv", index=False)
    make_distances((*singles, joint)).to_csv(run / "analysis" / "distances.csv", index=False)
    ck0 = cells[(cells.op == "reinit") & (cells.checkpoint == 0)]
    rand = cells[cells.op == "rerandomize"].groupby("group", sort=False)["error"].mean()
    verdicts = [
        dict(
            group=r.group,
            delta_error=r.delta_error,
            verdict="robust" if r.delta_error <= 0.02 else "critical",
            rerandomize_error_mean=rand[r.group],
        )
        for r in ck0.itertuples()
    ]
    summary = dict(
        final_error=FINAL_ERROR,
        final_loss=FINAL_LOSS,
        chance_error=0.9,
        threshold=0.02,
        verdicts=verdicts,
        coverage={**{g: [f"{g}.weight", f"{g}.bias"] for g in singles}, "_unassigned": ["head.scale"]},
        provenance={"version": "0.1.0", "git_commit": "abc1234", "torch": "2.6.0"},
        data=dict(name="fashion-mnist", stands_in_for=stands_in_for, n_test=10000, max_examples=None),
    )
    write_json(run / "analysis" / "summary.json", summary)
    write_json(
        run / "config.json",
        dict(
            model="fcn3", data="fashion-mnist", epochs=5, init="glorot", seed=0, version="0.1.0", git_commit="abc1234"
        ),
    )


def ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


def test_heatmap_layout_and_values():
    cells = make_cells()
    fig = plots.robustness_heatmap(cells, "error", vmax=0.9)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ticks(ax.get_xticklabels()) == ["rand", "0", "1", "2", "3", "5", "final"]
    assert ticks(ax.get_yticklabels()) == ["fc1", "fc2", "fc3", "fc2*+fc3*"]
    assert ax.images[0].get_clim() == (0.0, 0.9)
    grid = np.ma.filled(ax.images[0].get_array(), np.nan)
    raw = cells.set_index(["op", "group", "checkpoint"])["error"]
    assert grid[0, 0] == pytest.approx(np.mean([0.80, 0.82, 0.84]))  # fc1 rand, mean over 3 seeds
    assert grid[1, 1] == pytest.approx(raw[("reinit", "fc2", 0)])
    assert np.isnan(grid[2, 2])  # fc3 @ checkpoint 1
    assert np.all(grid[:, -1] == FINAL_ERROR)
    texts = [t.get_text() for t in ax.texts]
    assert "nan" in texts and "0.82\n±0.02" in texts


def test_heatmap_loss_scale_and_inf():
    fig = plots.robustness_heatmap(make_cells(), "loss")
    ax = fig.axes[0]
    assert "inf" in [t.get_text() for t in ax.texts]  # fc1's rand mean has an inf seed
    assert ax.images[0].get_clim() == (0.0, pytest.approx(3.0))  # largest finite value: rand mean (2+3+4)/3
    assert plots.robustness_heatmap(make_cells(), "error").axes[0].images[0].get_clim() == (0.0, 1.0)


def test_heatmap_transposes_deep_nets():
    deep = [f"block{i}" for i in range(10)]
    cells = make_cells(deep, ())
    ax = plots.robustness_heatmap(cells).axes[0]
    assert ticks(ax.get_xticklabels()) == deep
    assert ticks(ax.get_yticklabels()) == ["rand", "0", "1", "2", "3", "5", "final"]
    ax = plots.robustness_heatmap(cells, transpose=False).axes[0]
    assert ticks(ax.get_yticklabels()) == deep
    ax = plots.robustness_heatmap(make_cells(), transpose=True).axes[0]
    assert ticks(ax.get_yticklabels())[0] == "rand"


def test_heatmap_without_rerandomization():
    cells = make_cells()
    ax = plots.robustness_heatmap(cells[cells.op != "rerandomize"]).axes[0]
    assert ticks(ax.get_xticklabels()) == ["0", "1", "2", "3", "5", "final"]


def test_distance_heatmap():
    ax = plots.distance_heatmap(make_distances(), "linf").axes[0]
    assert ticks(ax.get_xticklabels()) == ["0", "1", "2", "3", "5"]
    assert ticks(ax.get_yticklabels()) == ["fc1", "fc2", "fc3", "fc2*+fc3*"]
    assert ax.images[0].get_clim() == (0.0, pytest.approx(0.2 * 4 * 5))
    with pytest.raises(CriticalityError, match="unknown norm"):
        plots.distance_heatmap(make_distances(), "l3")


def test_width_bars():
    """Fig 3: per (depth, width) the mean ± 1 std over seeds of each run's mean over layers 2..L."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        [
            dict(depth=d, width=w, group=g, seed=s, delta_error=rng.uniform(0, 0.1))
            for d in (3, 5)
            for w in (256, 32, 512)
            for g in ("fc2", "fc3")
            for s in range(3)
        ]
    )
    ax = plots.width_bars(df).axes[0]
    assert ticks(ax.get_xticklabels()) == ["32", "256", "512"]
    heights = [p.get_height() for p in ax.patches]
    per_run = df[df.depth == 3].groupby(["width", "seed"])["delta_error"].mean()
    assert heights[:3] == pytest.approx(list(per_run.groupby("width").mean()))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["FCN 3×H", "FCN 5×H"]
    with pytest.raises(CriticalityError, match="lacks columns"):
        plots.width_bars(df.drop(columns="seed"))


def test_bad_input():
    cells = make_cells()
    with pytest.raises(CriticalityError, match="no column"):
        plots.robustness_heatmap(cells, "accuracy")
    with pytest.raises(CriticalityError, match="exactly one 'final'"):
        plots.robustness_heatmap(cells[cells.op != "final"])


def test_save_writes_png_and_svg(tmp_path):
    fig = plots.robustness_heatmap(make_cells(), vmax=0.9)
    w, h = fig.get_size_inches()
    paths = plots.save(fig, tmp_path / "sub" / "heat.map")
    assert [p.name for p in paths] == ["heat.map.png", "heat.map.svg"]
    img = np.asarray(Image.open(paths[0]).convert("RGB"), dtype=float)
    assert img.shape[:2] == (round(h * plots.DPI), round(w * plots.DPI))
    assert img.std() > 10
    assert paths[1].read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["heat.map.png", "heat.map.svg"]  # no temps


def test_draw_run(tmp_path):
    write_run(tmp_path)
    paths = plots.draw_run(tmp_path)
    names = {p.name for p in paths}
    stems = ["robustness_error", "robustness_loss", "joint_error", "distance_l2", "distance_linf", "distance_l2_rel",
             "distance_linf_rel", "distance_cosine"]
    assert names == {f"{s}.{x}" for s in stems for x in ("png", "svg")}
    assert all(p.parent == tmp_path / "figures" and p.stat().st_size > 0 for p in paths)
    for p in paths:
        if p.suffix == ".png":
            assert np.asarray(Image.open(p).convert("L"), dtype=float).std() > 10
    # The CSV round trip keeps the final row's empty group, NaN and inf.
    back = plots.read_cells(tmp_path / "analysis" / "cells.csv")
    assert back.loc[back.op == "final", "group"].tolist() == [""]
    assert back["error"].isna().sum() == 1 and np.isinf(back["loss"]).sum() == 1
    assert str(back["checkpoint"].dtype) == "Int64"


def test_draw_run_joint_figure_rows(tmp_path):
    write_run(tmp_path)
    cells = plots.read_cells(tmp_path / "analysis" / "cells.csv")
    ax = plots.robustness_heatmap(cells, groups=["fc2", "fc3", JOINT]).axes[0]
    assert ticks(ax.get_yticklabels()) == ["fc2", "fc3", "fc2*+fc3*"]


def test_draw_run_without_analysis(tmp_path):
    with pytest.raises(CriticalityError, match="no analysis table"):
        plots.draw_run(tmp_path)
