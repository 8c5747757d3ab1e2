"""Reports from small synthetic suites: tables, published numbers, plots (a panel per method family), CSV, CLI."""
import csv
import itertools
import statistics
from dataclasses import dataclass

import pytest
import torch
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer

from prunekit.bench import Store, load_suite, run_suite, write_report
from prunekit.bench.report import FAMILY_TITLES, accuracy_figure, collect, cost_figure
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.methods import _REGISTRY, Method

SUITE = """\
name: tiny
description: magnitude against the random control on synthetic data
model: lenet300
dataset: synthetic
train_size: 600
test_size: 200
dense: {epochs: 2, lr: 0.05}
sparsities: [0.5, 0.9]
seeds: 2
methods:
  - method: magnitude
  - method: random
    label: random-control
published:
  - {method: magnitude, sparsity: 0.9, accuracy: 0.5, std: 0.02, source: "Made-up et al. 2030, Table 9"}
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    (folder / "tiny.yaml").write_text(SUITE)
    path = folder / "runs.db"
    run_suite(load_suite(str(folder / "tiny.yaml")), path, progress=False, echo=lambda line: None)
    return path


def accuracies(db, label: str, sparsity: float) -> list[float]:
    with Store(db) as store:
        return [run.final.accuracy for run in store.runs() if run.label == label and run.sparsity == sparsity]


def test_markdown_report_has_every_table_and_links_its_plots(db, tmp_path):
    written = write_report(db, tmp_path / "report")
    assert [path.name for path in written] == ["report.md", "tiny-accuracy.png", "tiny-cost.png"]
    for png in written[1:]:
        assert png.read_bytes().startswith(PNG_SIGNATURE) and png.stat().st_size > 10_000
    text = written[0].read_text()
    assert "## tiny" in text and "magnitude against the random control" in text
    assert "lenet300 on synthetic, train_size 600, test_size 200" in text
    assert "| method | 0.5 | 0.9 | seeds |" in text
    values = [100 * a for a in accuracies(db, "magnitude", 0.9)]
    cell = f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
    assert "| magnitude | " in text and cell in text  # mean ± std over the two seeds
    assert "| random-control | " in text
    assert "![accuracy vs sparsity](tiny-accuracy.png)" in text and "![cost vs sparsity](tiny-cost.png)" in text
    published = next(line for line in text.splitlines() if "Made-up et al. 2030" in line)
    assert published.startswith("| magnitude | 0.9 | 50.00 ± 2.00 | " + cell)
    assert f"{statistics.fmean(values) - 50:+.2f}" in published
    assert "Wall seconds of pruning" in text and "| fc1.weight |" in text
    assert "### Environment" in text and f"| {torch.__version__} |" in text
    assert "Dense model: top-1" in text and "Failed runs" not in text


def test_csv_has_one_row_per_result_with_config_and_cost(db, tmp_path):
    (path,) = write_report(db, tmp_path / "csv", fmt="csv")
    with path.open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 8
    assert {row["label"] for row in table} == {"magnitude", "random-control"}
    row = next(r for r in table if r["label"] == "magnitude" and r["target_sparsity"] == "0.9" and r["seed"] == "1")
    assert float(row["accuracy"]) in accuracies(db, "magnitude", 0.9)
    assert abs(float(row["sparsity"]) - 0.9) < 1e-3 and row["final"] == "1"
    with Store(db) as store:
        run = next(r for r in store.runs() if r.label == "magnitude" and r.sparsity == 0.9 and r.seed == 1)
    assert float(row["seconds"]) == run.final.cost["seconds"] > 0  # the stored run's own time, not any number
    assert row["forward_examples"] == "0" and row["mask_path"] == run.mask_path


def test_report_errors_are_clear(db, tmp_path):
    with pytest.raises(PrunekitError, match="no runs database at"):
        write_report(tmp_path / "none.db", tmp_path / "out")
    with pytest.raises(PrunekitError, match="holds no runs for suite 'other'; suites in it: tiny"):
        write_report(db, tmp_path / "out", suite="other")
    with pytest.raises(PrunekitError, match="unknown; use one of markdown, csv"):
        write_report(db, tmp_path / "out", fmt="pdf")


def test_cli_bench_list_bench_and_report(db, tmp_path, capsys):
    assert main(["bench", "--list"]) == 0
    assert "demo" in capsys.readouterr().out
    suite = tmp_path / "tiny.yaml"
    suite.write_text(SUITE.replace("seeds: 2", "seeds: 1"))
    assert main(["bench", "--suite", str(suite), "--db", str(tmp_path / "cli.db")]) == 0
    out = capsys.readouterr().out
    assert "suite tiny: 4 runs, 0 already done, 4 run now" in out and "random-control" in out
    assert main(["report", "--db", str(tmp_path / "cli.db"), "--out", str(tmp_path / "r"), "--format", "csv"]) == 0
    assert (tmp_path / "r" / "results.csv").exists()
    suite.write_text(SUITE.replace("seeds: 2", "seeds: zero"))
    assert main(["bench", "--suite", str(suite), "--db", str(tmp_path / "cli.db")]) == 2
    assert f"suite {suite}, line 9: `seeds` must be" in capsys.readouterr().err


# ---------------------------------------------------------------- one panel per method family

# Stand-in methods with chosen families, so that the panels do not depend on how the real methods are filed.
# Eleven in one family: more than the ten colours of the palette.
FAMILY_METHODS = {"one-shot": 2, "training": 11, "at-init": 1}
FAMILY_SUITE = """\
name: families
model: lenet300
dataset: synthetic
train_size: 300
test_size: 100
dense: {epochs: 1, lr: 0.05}
sparsities: [0.5, 0.9]
seeds: 1
methods:
""" + "".join(f"  - method: test-{family}-{index}\n" for family, count in FAMILY_METHODS.items()
              for index in range(count)) + """\
  - method: test-broken
published:
  - {method: test-one-shot-0, sparsity: 0.9, accuracy: 0.5, source: "Made-up et al. 2030"}
"""


@dataclass(frozen=True)
class NoHparams:
    pass


def magnitude_scores(ctx, hp):
    return ctx.select({target.name: target.weight.detach().abs() for target in ctx.targets})


def broken(ctx, hp):
    raise ValueError("scores went NaN")


@pytest.fixture(scope="module")
def family_db(tmp_path_factory):
    """A suite whose methods come from every family, one of them failing; the stand-ins stay registered."""
    with pytest.MonkeyPatch.context() as patch:
        for family, count in FAMILY_METHODS.items():
            for index in range(count):
                name = f"test-{family}-{index}"
                patch.setitem(_REGISTRY, name, Method(name, magnitude_scores, NoHparams, "magnitude", family=family))
        patch.setitem(_REGISTRY, "test-broken", Method("test-broken", broken, NoHparams, "fails", family="training"))
        folder = tmp_path_factory.mktemp("families")
        (folder / "families.yaml").write_text(FAMILY_SUITE)
        path = folder / "runs.db"
        run_suite(load_suite(str(folder / "families.yaml")), path, progress=False, echo=lambda line: None)
        yield path


def family_results(db):
    with Store(db) as store:
        (results,) = collect(store)
    return results


def panels(figure):
    """The plotting axes, each titled with its family where a column starts."""
    return [axes for axes in figure.axes if axes.axison]


def legends(figure) -> list[list[str]]:
    """The entries of each family's legend, drawn in a hidden axes under the family's panels."""
    return [[text.get_text() for text in axes.get_legend().get_texts()] for axes in figure.axes if not axes.axison]


def style(handle) -> tuple:
    line = handle.lines[0] if isinstance(handle, ErrorbarContainer) else handle
    return to_hex(line.get_color()), line.get_marker(), line.get_linestyle()


@pytest.mark.parametrize("make_figure, rows", [(accuracy_figure, 1), (cost_figure, 2)])
def test_plots_have_a_column_of_panels_per_family_present_sharing_y(family_db, make_figure, rows):
    figure = make_figure(family_results(family_db))
    axes = panels(figure)
    titles = [panel.get_title() for panel in axes if panel.get_title()]
    assert titles == [FAMILY_TITLES[family] for family in FAMILY_METHODS]
    assert len(axes) == rows * len(FAMILY_METHODS)
    for row in range(rows):
        first, *others = axes[row::rows]
        assert all(first.get_shared_y_axes().joined(first, other) for other in others)


def test_each_family_has_a_legend_of_its_own_methods_with_dense_and_published(family_db):
    assert legends(accuracy_figure(family_results(family_db))) == [
        ["dense", "test-one-shot-0", "test-one-shot-0 (published)", "test-one-shot-1"],
        ["dense"] + sorted(f"test-training-{index}" for index in range(11)),
        ["dense", "test-at-init-0"]]


@pytest.mark.parametrize("make_figure", [accuracy_figure, cost_figure])
def test_no_two_lines_of_a_panel_look_alike(family_db, make_figure):
    for panel in panels(make_figure(family_results(family_db))):
        handles, labels = panel.get_legend_handles_labels()
        styles = [style(handle) for handle in handles if not hasattr(handle, "get_offsets")]  # scatters are no lines
        assert len(set(styles)) == len(styles), labels
        for (colour, *rest), (other_colour, *other_rest) in itertools.combinations(styles, 2):
            if colour == other_colour:  # a colour comes back only with another marker and another line style
                assert all(a != b for a, b in zip(rest, other_rest)), labels


def test_a_method_no_longer_registered_is_drawn_as_one_shot(family_db, monkeypatch):
    monkeypatch.delitem(_REGISTRY, "test-at-init-0")
    figure = accuracy_figure(family_results(family_db))
    assert [panel.get_title() for panel in panels(figure)] == [FAMILY_TITLES["one-shot"], FAMILY_TITLES["training"]]
    assert "test-at-init-0" in legends(figure)[0]


def test_the_report_still_lists_failures_and_draws_the_rest(family_db, tmp_path):
    report, *plots = write_report(family_db, tmp_path)
    assert [path.name for path in plots] == ["families-accuracy.png", "families-cost.png"]
    text = report.read_text()
    assert "### Failed runs" in text
    assert "| test-broken | 0.5 | 0 | 1 | ValueError: scores went NaN |" in text
    assert not any("test-broken" in legend for legend in legends(accuracy_figure(family_results(family_db))))
