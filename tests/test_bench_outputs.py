"""What a bench leaves behind when a run fails for real, through the command line: the exit code, the report's
failed-runs section (bench and demo), and the mask file of every finished run beside the database."""
import contextlib
import io
import shutil
from pathlib import Path

import pytest
import torch

import prunekit
import prunekit.bench
from prunekit import workflow
from prunekit.bench import Store, load_suite
from prunekit.cli import main
from prunekit.masks import read_masks

# CHITA's memory guard refuses this run after the dense model is trained: a failure inside a run, as any could fail.
SUITE = """\
name: tiny
model: lenet300
dataset: synthetic
train_size: 200
test_size: 100
dense: {epochs: 1, lr: 0.05}
sparsities: [0.5]
seeds: 1
methods:
  - method: magnitude
  - method: chita
    hparams: {max_memory: 0.000001, fisher_samples: 16}
"""
FAILURE = "above --max-memory"


def run_cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in argv])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, int, str]:
    folder = tmp_path_factory.mktemp("bench")
    (folder / "tiny.yaml").write_text(SUITE)
    code, err = run_cli("bench", "--suite", folder / "tiny.yaml", "--db", folder / "runs.db")
    return folder, code, err


def test_a_failed_run_makes_bench_exit_2_with_a_one_line_error(bench):
    _, code, err = bench
    last = err.splitlines()[-1]
    assert code == 2 and last.startswith("prunekit: error: 1 run(s) of suite tiny failed") and FAILURE in last


def test_the_report_lists_the_failed_run_with_its_error(bench, tmp_path):
    folder, _, _ = bench
    assert run_cli("report", "--db", folder / "runs.db", "--out", tmp_path)[0] == 0
    failed = (tmp_path / "report.md").read_text().split("### Failed runs")[1]
    row = next(line for line in failed.splitlines() if line.startswith("| chita |"))
    assert "| 0.5 | 0 |" in row and FAILURE in row
    assert "| magnitude |" not in failed.split("###")[0]


def test_demo_writes_its_report_and_then_fails_when_a_run_failed(bench, tmp_path, monkeypatch):
    folder, _, _ = bench
    copy = shutil.copytree(folder, tmp_path / "bench")  # its cached dense model saves the training
    (copy / "demo.yaml").write_text(SUITE.replace("name: tiny", "name: demo"))
    monkeypatch.setattr(prunekit.bench, "load_suite", lambda name: load_suite(str(copy / f"{name}.yaml")))
    code, err = run_cli("demo", "--db", copy / "runs.db", "--out", tmp_path / "report")
    assert code == 2 and "1 run(s) of suite demo failed" in err
    assert FAILURE in (tmp_path / "report" / "report.md").read_text().split("### Failed runs")[1]


def test_each_finished_run_has_its_masks_in_a_file_beside_the_database(bench):
    folder, _, _ = bench
    with Store(folder / "runs.db") as store:
        finished = [run for run in store.runs() if run.mask_path]
    assert [run.method for run in finished] == ["magnitude"]
    run = finished[0]
    assert Path(run.mask_path).parent == (folder / "runs.db.masks").resolve()
    masks, metadata = read_masks(run.mask_path)
    assert (metadata["run"], metadata["method"], metadata["seed"]) == (run.hash, "magnitude", run.seed)
    assert {name: 1 - float(mask.float().mean()) for name, mask in masks.items()} == pytest.approx(run.final.layers)
    # the masks are magnitude's on the dense model the run started from
    (dense,) = (folder / "runs.db.dense").glob("*.safetensors")
    setup = workflow.setup("lenet300", "synthetic", checkpoint=dense)
    expected = prunekit.prune(setup.model, "magnitude", 0.5).masks
    assert masks.keys() == expected.keys() and all(torch.equal(masks[n], expected[n]) for n in masks)
