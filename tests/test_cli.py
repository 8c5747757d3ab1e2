"""The command line, in process: help texts, train → prune → eval round trips, and errors."""
import argparse
import builtins
import re

import pytest
import torch

import prunekit.api
from prunekit import training, workflow
from prunekit.checkpoints import read_state_dict
from prunekit.cli import build_parser, main
from prunekit.masks import read_masks, save_masks

MODEL = ["--model", "lenet300", "--dataset", "synthetic"]
TRAIN = ["train", *MODEL, "--epochs", "2", "--lr", "0.05"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(capsys, *argv) -> str:
    """The one line a failing command prints, after checking it exits with 2."""
    code, _, err = run(capsys, *argv)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("prunekit: error: "), err
    return lines[0]


def accuracy_of(out: str) -> float:
    return float(out.split("test accuracy ")[1].split(",")[0])


def started_work(*args, **kwargs):
    raise AssertionError("the command started its work before finding the error")


@pytest.fixture
def no_pruning(monkeypatch):
    """Fails the test if a command gets as far as pruning, training or evaluating."""
    for owner, name in ((prunekit.api, "prune"), (workflow, "train"), (workflow, "evaluate")):
        monkeypatch.setattr(owner, name, started_work)


@pytest.fixture
def no_setup(monkeypatch, no_pruning):
    """Fails the test if a command even loads its data or builds its model."""
    monkeypatch.setattr(workflow, "setup", started_work)


@pytest.fixture(scope="module")
def dense_weights(tmp_path_factory):
    """Weights trained by the command line (TRAIN), its log beside them."""
    path = tmp_path_factory.mktemp("dense") / "dense.safetensors"
    assert main([*TRAIN, "--out", str(path), "--log", str(path.with_name("log.jsonl"))]) == 0
    return path


# ---------------------------------------------------------------- help


# "(default 0.9)", "defaults to 3", "default=4": a default said otherwise than "(default: X)"
OTHER_DEFAULT_STYLES = re.compile(r"\bdefault(?:s? to\b|\s*=|\s+[-\d.'\"(])")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_methods_lists_registry_and_hyperparameters(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "magnitude" in out and "random" in out
    code, out, _ = run(capsys, "methods", "magnitude")
    assert code == 0 and "no hyperparameters" in out
    code, out, _ = run(capsys, "methods", "synflow")
    assert code == 0 and re.search(r"iterations\s.*int", out)


@pytest.mark.parametrize("command", list(subcommands()))
def test_every_command_has_help_listing_every_flag(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: prunekit {command}")
    flags = [flag for action in subcommands()[command]._actions for flag in action.option_strings]
    assert all(flag in out for flag in flags)


@pytest.mark.parametrize("command", list(subcommands()))
def test_every_flag_states_its_default_in_one_style(command):
    parser = subcommands()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action)
        if action.required:
            assert "default" not in text, action.option_strings
            continue
        # "(default: X)" is the only way a default is said (a method flag says one per group of methods)
        assert "(default: " in text and not OTHER_DEFAULT_STYLES.search(text), text
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, text
        elif action.default is False:
            assert text.endswith("(default: off)"), text


def test_dataclass_flags_state_the_dataclass_defaults():
    budget_help = {a.dest: a.help for a in subcommands()["prune"]._actions}
    assert "(default: global)" in budget_help["allocation"] and "(default: 2)" in budget_help["n"]
    training_help = {a.dest: a.help for a in subcommands()["train"]._actions}
    assert "(default: cosine)" in training_help["lr_schedule"]


def test_no_command_prints_the_commands_and_fails(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and all(command in out for command in subcommands())


# ---------------------------------------------------------------- round trips


def test_train_prune_eval_round_trip(capsys, tmp_path, dense_weights):
    dense = dense_weights
    assert len(dense.with_name("log.jsonl").read_text().splitlines()) == 3  # the config, then one line per epoch
    pruned, masks = tmp_path / "pruned.safetensors", tmp_path / "masks.safetensors"
    code, out, err = run(capsys, "prune", *MODEL, "--checkpoint", str(dense), "--method", "magnitude",
                         "--sparsity", "0.8", "--budget", "uniform", "--out", str(pruned), "--masks-out", str(masks))
    assert code == 0, err
    accuracy = accuracy_of(out)
    state, _ = read_state_dict(pruned)
    stored_masks, metadata = read_masks(masks)
    assert sorted(stored_masks) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    for name, mask in stored_masks.items():  # the uniform budget is exact in every tensor
        assert int((~mask).sum()) == round(0.8 * mask.numel())
        assert torch.equal(state[name] == 0, ~mask)
    assert metadata["method"] == "magnitude" and metadata["budget"]["allocation"] == "uniform"
    # the pruned weights alone, and the dense weights with the masks, evaluate the same
    for extra in ([str(pruned)], [str(dense), "--masks", str(masks)]):
        code, out, err = run(capsys, "eval", *MODEL, "--checkpoint", *extra)
        assert code == 0, err
        assert accuracy_of(out) == accuracy
        assert "0.8000" in out


def test_method_hyperparameters_reach_the_method(capsys, tmp_path, dense_weights):
    masks = tmp_path / "masks.safetensors"
    code, _, err = run(capsys, "prune", *MODEL, "--checkpoint", str(dense_weights), "--method", "synflow",
                       "--iterations", "3", "--sparsity", "0.5", "--no-eval", "--masks-out", str(masks))
    assert code == 0, err
    metadata = read_masks(masks)[1]
    assert metadata["method"] == "synflow" and metadata["hparams"]["iterations"] == 3


@pytest.mark.parametrize(("flags", "pruned_fraction"), [
    (["--include", r"^fc2\."], {"fc2.weight": 0.5}),
    (["--exclude", r"^fc3\."], {"fc1.weight": 0.5, "fc2.weight": 0.5}),
    (["--exclude", r"^fc3\.", "--layer-sparsity", '{"^fc1": 0.9}'], {"fc1.weight": 0.9, "fc2.weight": 0.5}),
])
def test_include_exclude_and_layer_sparsity_choose_the_tensors(capsys, tmp_path, dense_weights, flags,
                                                               pruned_fraction):
    masks = tmp_path / "masks.safetensors"
    code, _, err = run(capsys, "prune", *MODEL, "--checkpoint", str(dense_weights), "--sparsity", "0.5",
                       "--budget", "uniform", *flags, "--no-eval", "--masks-out", str(masks))
    assert code == 0, err
    stored = read_masks(masks)[0]
    assert stored.keys() == pruned_fraction.keys()
    for name, fraction in pruned_fraction.items():
        assert int((~stored[name]).sum()) == round(fraction * stored[name].numel())


def test_train_resume_after_ctrl_c_ends_where_an_uninterrupted_run_ends(capsys, tmp_path, monkeypatch,
                                                                       dense_weights):
    evaluations = []
    evaluate = training.evaluate

    def evaluate_counted(*args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == 2:  # the second epoch of the first attempt
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    resumed, state = tmp_path / "resumed.safetensors", tmp_path / "state.pt"
    monkeypatch.setattr(training, "evaluate", evaluate_counted)
    code, _, err = run(capsys, *TRAIN, "--out", str(resumed), "--resume", str(state))
    assert code == 130 and "interrupted" in err
    assert state.exists() and not resumed.exists()
    code, _, err = run(capsys, *TRAIN, "--out", str(resumed), "--resume", str(state))
    assert code == 0, err
    assert len(evaluations) == 3  # the second attempt trained the second epoch only
    expected = read_state_dict(dense_weights)[0]  # trained by the same command without interruption
    assert all(torch.equal(tensor, expected[key]) for key, tensor in read_state_dict(resumed)[0].items())


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("argv", "names"), [  # what the message must name (a regex)
    (["--method", "nope"], "unknown method 'nope'"),
    (["--sparsity", "1.2"], r"(?=.*1\.2)(?=.*\[0, 1\))"),
    (["--out", "{tmp}/missing/x.safetensors"], "missing.*does not exist"),
    (["--method", "magnitude", "--iterations", "3"], "--iterations.*not of magnitude"),
    (["--n", "two"], "'two'"),
    (["--structure", "nm", "--n", "4", "--m", "4"], r"N:M|\bn=4\b"),
])
def test_prune_errors_are_one_line_before_any_work(capsys, tmp_path, no_setup, argv, names):
    line = error_line(capsys, "prune", *MODEL, *(arg.format(tmp=tmp_path) for arg in argv))
    assert re.search(names, line), line
    assert list(tmp_path.iterdir()) == []


def test_bench_without_a_suite_says_how_to_name_one(capsys, no_setup):
    assert "--suite NAME" in error_line(capsys, "bench")


@pytest.mark.parametrize(("argv", "message"), [
    (["prune", "--model", "resnet99", "--dataset", "synthetic"], "unknown model"),
    (["eval", "--model", "resnet20", "--dataset", "synthetic"], "inputs of shape"),
    (["prune", "--model", "lenet300", "--dataset", "mnist", "--data-dir", "{tmp}"], "PRUNEKIT_DATA"),
])
def test_setup_errors_are_one_line_before_pruning(capsys, tmp_path, no_pruning, argv, message):
    assert message in error_line(capsys, *(arg.format(tmp=tmp_path) for arg in argv))
    assert list(tmp_path.iterdir()) == []


def test_a_mismatched_checkpoint_is_one_line(capsys, tmp_path, no_pruning, dense_weights):
    line = error_line(capsys, "eval", "--model", "mlpnet", "--dataset", "synthetic",
                      "--checkpoint", str(dense_weights))
    assert "does not fit the model" in line and "--model lenet300" in line


def test_masks_of_another_model_are_refused_before_evaluating(capsys, tmp_path, no_pruning, dense_weights):
    masks = tmp_path / "mlpnet-masks.safetensors"
    save_masks({"fc1.weight": torch.ones(40, 784, dtype=torch.bool)}, masks)
    line = error_line(capsys, "eval", *MODEL, "--checkpoint", str(dense_weights), "--masks", str(masks))
    assert "fc1.weight has shape (40, 784)" in line and "another model" in line


class CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (str(self.path), "w")


def test_a_pickled_checkpoint_is_refused_without_running_its_code(capsys, tmp_path, no_pruning):
    checkpoint, marker = tmp_path / "model.pt", tmp_path / "marker"
    torch.save({"state_dict": {}, "hook": CreatesFileWhenUnpickled(marker)}, checkpoint,
               _use_new_zipfile_serialization=False)
    line = error_line(capsys, "eval", *MODEL, "--checkpoint", str(checkpoint))
    assert "arbitrary unpickling" in line and "refuses" in line
    assert not marker.exists()


@pytest.mark.parametrize("argv", [["prune", *MODEL, "--sparsity", "abc"], ["prune", "--dataset", "synthetic"]])
def test_malformed_command_lines_are_one_line_usage_errors(capsys, argv, no_setup):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("prunekit prune: error: ") and "prunekit prune --help" in lines[0]


def test_ctrl_c_exits_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "setup", interrupted)
    code, _, err = run(capsys, "prune", *MODEL)
    assert code == 130 and err == "prunekit: interrupted\n"


@pytest.mark.parametrize("command", ["train", "prune", "eval"])
def test_device_cuda_without_a_gpu_is_refused_before_work(capsys, tmp_path, monkeypatch, no_pruning, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = ["--out", str(tmp_path / "w.safetensors")] if command != "eval" else []
    line = error_line(capsys, command, *MODEL, "--device", "cuda", *out)
    assert "torch.cuda.is_available() is false" in line and "--device cpu" in line
    assert list(tmp_path.iterdir()) == []
