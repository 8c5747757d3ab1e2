"""The command line, in process: help texts, a train → prune → eval round trip, and errors."""
import pytest
import torch

from prunekit.cli import main
from prunekit.checkpoints import read_state_dict
from prunekit.masks import read_masks


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_lists_registry_and_hyperparameters(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "magnitude" in out and "random" in out
    code, out, _ = run(capsys, "methods", "magnitude")
    assert code == 0 and "no hyperparameters" in out


@pytest.mark.parametrize("command", ["train", "prune", "eval", "demo", "methods"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: prunekit" in out


def test_help_lists_flags_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    for flag in ("--budget", "--structure", "--n", "--m", "--layer-sparsity", "--sparsity", "--method"):
        assert flag in out
    assert "(default: global)" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--lr-schedule" in out and "(default: cosine)" in out


def test_train_prune_eval_round_trip(capsys, tmp_path):
    dense = tmp_path / "dense.safetensors"
    code, out, err = run(capsys, "train", "--model", "lenet300", "--dataset", "synthetic", "--epochs", "3",
                         "--lr", "0.05", "--out", str(dense), "--log", str(tmp_path / "log.jsonl"))
    assert code == 0, err
    assert dense.exists() and len((tmp_path / "log.jsonl").read_text().splitlines()) == 4
    pruned, masks = tmp_path / "pruned.safetensors", tmp_path / "masks.safetensors"
    code, out, err = run(capsys, "prune", "--model", "lenet300", "--dataset", "synthetic", "--checkpoint", str(dense),
                         "--method", "magnitude", "--sparsity", "0.8", "--budget", "uniform",
                         "--out", str(pruned), "--masks-out", str(masks))
    assert code == 0, err
    accuracy = float(out.split("test accuracy ")[1].split(",")[0])
    state, metadata = read_state_dict(pruned)
    assert sum(int((t == 0).sum()) for k, t in state.items() if k.endswith("weight")) >= 0.8 * sum(
        t.numel() for k, t in state.items() if k.endswith("weight")) - 3
    assert read_masks(masks)[1]["method"] == "magnitude"
    # the pruned weights alone, and the dense weights with the masks, evaluate the same
    for extra in ([str(pruned)], [str(dense), "--masks", str(masks)]):
        code, out, err = run(capsys, "eval", "--model", "lenet300", "--dataset", "synthetic", "--checkpoint", *extra)
        assert code == 0, err
        assert float(out.split("test accuracy ")[1].split(",")[0]) == accuracy
        assert "0.8000" in out


def test_errors_are_one_line_and_before_work(capsys, tmp_path):
    code, _, err = run(capsys, "prune", "--model", "lenet300", "--dataset", "synthetic", "--method", "nope")
    assert code == 2 and "unknown method 'nope'" in err
    code, _, err = run(capsys, "prune", "--model", "lenet300", "--dataset", "synthetic", "--sparsity", "1.2")
    assert code == 2 and "[0, 1)" in err
    code, _, err = run(capsys, "prune", "--model", "lenet300", "--dataset", "synthetic",
                       "--out", str(tmp_path / "missing" / "x.safetensors"))
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "prune", "--model", "resnet99", "--dataset", "synthetic")
    assert code == 2 and "unknown model" in err
    code, _, err = run(capsys, "eval", "--model", "resnet20", "--dataset", "synthetic")
    assert code == 2 and "inputs of shape" in err
    code, _, err = run(capsys, "prune", "--model", "lenet300", "--dataset", "mnist", "--data-dir", str(tmp_path))
    assert code == 2 and "PRUNEKIT_DATA" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "prune", "eval"])
def test_device_cuda_without_a_gpu_is_refused_before_work(capsys, tmp_path, command):
    out = ["--out", str(tmp_path / "w.safetensors")] if command != "eval" else []
    code, _, err = run(capsys, command, "--model", "lenet300", "--dataset", "synthetic", "--device", "cuda", *out)
    assert code == 2 and "torch.cuda.is_available() is false" in err and "--device cpu" in err
    assert list(tmp_path.iterdir()) == []
