"""`adapt-pretrain report` renders non-blank PNGs and an HTML page from metrics.jsonl written by Monitor."""
from __future__ import annotations

import os

import numpy as np
import pytest

from adapt_pretrain.cli import main as cli_main
from adapt_pretrain.monitor import read_metrics
from adapt_pretrain.monitor.report import PLOTS, main, render
from tests.monitor.synthetic import DOMAINS, write_synthetic_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = [str(root / "adapt"), str(root / "uniform")]
    for seed, d in enumerate(dirs):
        write_synthetic_run(d, steps=60, seed=seed)
    return dirs


def _assert_real_image(path: str) -> None:
    import matplotlib.image as mpimg

    assert os.path.getsize(path) > 10_000, path
    img = mpimg.imread(path)[..., :3]
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img.std() > 0.05, f"{path} looks blank"
    # more than background and text: a real share of non-white, coloured pixels
    assert (np.abs(img - img.mean(axis=2, keepdims=True)).sum(axis=2) > 0.1).mean() > 0.005, path


def test_synthetic_run_has_a_curriculum(runs):
    steps, _ = read_metrics(runs[0])
    first, last = steps[0]["scalars"], steps[59]["scalars"]
    spread = lambda s: np.ptp([s[f"domain/{d}/mean_weight"] for d in DOMAINS])  # noqa: E731
    assert spread(last) > 5 * spread(first)  # weights start near-uniform and become discriminative


def test_single_run_report_via_cli(runs, capsys):
    assert cli_main(["report", runs[0]]) == 0
    out = os.path.join(runs[0], "report")
    for name in PLOTS:
        _assert_real_image(os.path.join(out, f"{name}.png"))
    page = open(os.path.join(out, "index.html")).read()
    assert all(f'src="{name}.png"' in page for name in PLOTS) and "adapt/effective_data_ratio" in page
    assert "wrote 5 files" in capsys.readouterr().out


def test_comparison_report(runs, tmp_path):
    paths = render(runs, str(tmp_path / "cmp"))
    assert len(paths) == 5
    for p in paths[:-1]:
        _assert_real_image(p)
    page = open(paths[-1]).read()
    assert "adapt" in page and "uniform" in page


def test_report_rejects_missing_run(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope")])


def test_smoothing_option(runs, tmp_path):
    from adapt_pretrain.monitor.report import ema

    np.testing.assert_allclose(ema(np.array([1.0, 0.0, 0.0]), 0.5), [1.0, 0.5, 0.25])
    np.testing.assert_allclose(ema(np.array([1.0, 0.0]), 0.5, np.array([0, 2])), [1.0, 0.25])  # decays per step
    assert main([runs[0], runs[1], "--out", str(tmp_path / "s"), "--smooth", "0.9"]) == 0
    _assert_real_image(str(tmp_path / "s" / "curriculum.png"))
    with pytest.raises(SystemExit):
        main([runs[0], "--smooth", "1.5"])


def test_report_of_a_run_without_adapt_metrics(runs, tmp_path):
    from adapt_pretrain.monitor import Monitor, WandbConfig

    plain = str(tmp_path / "plain")
    with Monitor(plain, {}, WandbConfig(enabled=False), stdout=False) as mon:
        for step in range(20):
            mon.log_step(step, {"loss": 5.0 - 0.1 * step})
    paths = render([plain, runs[0]], str(tmp_path / "mixed"))  # a baseline next to an ADAPT run
    assert all(os.path.getsize(p) > 0 for p in paths)
    paths = render([plain], str(tmp_path / "only"))  # nothing but a loss: placeholders, no crash
    assert all(os.path.getsize(p) > 0 for p in paths)


def test_heatmap_columns_are_normalised_per_step():
    """A step with every group in one bin must not wash out the others: each column peaks at 1."""
    from adapt_pretrain.monitor.report import relative_density

    mat = np.array([[0.0, 1.0, 0.0], [64.0, 3.0, 0.0], [0.0, 2.0, 0.0]])  # steps as columns; the last is empty
    rel = relative_density(mat)
    assert np.allclose(rel.filled(0.0), [[0, 1 / 3, 0], [1, 1, 0], [0, 2 / 3, 0]])
    assert rel.mask.tolist() == [[True, False, True], [False, False, True], [True, False, True]]


def test_heatmap_resolves_a_narrow_spread(tmp_path):
    """Weights spread over ~0.02 (typical of a real run) must cover many rows of every column: with
    the former 64 fixed bins every group of a step fell into one or two and the map showed blocks."""
    import torch

    from adapt_pretrain.monitor import Monitor, StatsLayout, WandbConfig, finalize, partial_stats
    from adapt_pretrain.monitor.report import RunSeries, heatmap_matrix

    layout = StatsLayout(num_domains=1)  # the trainer's default bins
    g = torch.Generator().manual_seed(0)
    with Monitor(str(tmp_path / "narrow"), {}, WandbConfig(enabled=False), stdout=False) as mon:
        for step in range(10):
            w = 0.7 - 0.005 * step + 0.004 * torch.randn(256, generator=g, dtype=torch.float64)
            m = finalize(partial_stats(layout, w, torch.zeros(256), torch.ones(256), torch.zeros(256, dtype=torch.long),
                                       torch.ones(256)))
            mon.log_step(step, m.scalars, m.histograms)
    steps, events = read_metrics(str(tmp_path / "narrow"))
    grid, mat = heatmap_matrix(RunSeries("narrow", "", steps, events).histograms("hist/weights"))
    rows_used = (mat > 0).sum(axis=0)
    assert rows_used.min() >= 8, rows_used  # every step's spread shows as a distribution, not a block
    assert np.allclose(mat.sum(axis=0), 256)  # re-binning onto the common grid keeps every group
    assert grid[1] - grid[0] <= 1 / 512 + 1e-12
