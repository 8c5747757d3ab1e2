"""Reports from a small synthetic suite: tables, published numbers, plots, CSV, and the CLI."""
import csv
import statistics

import pytest
import torch

from prunekit.bench import Store, load_suite, run_suite, write_report
from prunekit.cli import main
from prunekit.errors import PrunekitError

SUITE = """\
name: tiny
description: magnitude against the random control on synthetic data
model: lenet300
dataset: synthetic
train_size: 600
test_size: 200
dense: {epochs: 2, lr: 0.05, batch_size: 64}
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
    assert float(row["seconds"]) >= 0 and row["forward_examples"] == "0" and row["mask_path"].endswith(".safetensors")


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
