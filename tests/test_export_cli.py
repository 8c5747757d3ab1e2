"""`prunekit export`: each format written, sized and timed; bad input refused in one line before any work."""
from __future__ import annotations

import builtins
import re
import shutil

import pytest
import torch
from torch import nn

import prunekit
from prunekit import workflow
from prunekit.checkpoints import read_state_dict, save_model
from prunekit.cli import main
from prunekit.export import command, load_compact, timing
from prunekit.export.memory_format import CHANNELS_LAST, CONTIGUOUS
from prunekit.export.sparse_files import SPARSE_FILE_FORMAT
from test_cli import error_line as cli_error_line
from test_cli import run as cli_run

MODEL = ["--model", "lenet300", "--dataset", "synthetic"]


def run(capsys, *argv):
    """test_cli's run with paths as strings."""
    return cli_run(capsys, *map(str, argv))


def error_line(capsys, *argv) -> str:
    return cli_error_line(capsys, *map(str, argv))


def started_work(*args, **kwargs):
    raise AssertionError("the command loaded the model before finding the error")


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch):
    """One short turn per candidate: these tests check what is written and printed, not the timing itself
    (tests/test_export_sparse_layers.py checks the decisions; the benchmarks measure)."""
    monkeypatch.setattr(timing, "ROUNDS", 1)
    monkeypatch.setattr(timing, "MIN_SECONDS", 0.0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """lenet300 on synthetic data pruned 90% unstructured, and 50% in coupled channel groups."""
    folder = tmp_path_factory.mktemp("pruned")
    for name, flags in (("unstructured", []), ("groups", ["--structure", "groups", "--sparsity", "0.5"])):
        argv = ["prune", *MODEL, "--sparsity", "0.9", *flags, "--no-eval", "--out", str(folder / f"{name}.safetensors")]
        assert main(argv) == 0
    return folder


def export(capsys, checkpoint, fmt, out, *extra):
    return run(capsys, "export", *MODEL, "--checkpoint", checkpoint, "--format", fmt, "--out", out,
               "--threads", "1", *extra)


def test_sparse_export_is_a_quarter_of_the_dense_file_and_loads_back_bit_exactly(capsys, checkpoints, tmp_path):
    code, out, err = export(capsys, checkpoints / "unstructured.safetensors", "sparse", tmp_path / "s.safetensors")
    assert code == 0, err
    ratio = float(out.split("safetensors (")[1].split("×")[0])
    assert ratio <= 0.25 and "latency on 8 test examples of synthetic" in out and "sparse linear layers" in out
    written, metadata = read_state_dict(tmp_path / "s.safetensors")
    original, _ = read_state_dict(checkpoints / "unstructured.safetensors")
    assert metadata["format"] == SPARSE_FILE_FORMAT and written.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(written[key].view(torch.uint8), tensor.view(torch.uint8)), key


def test_compact_export_writes_fewer_parameters_and_loads_back(capsys, checkpoints, tmp_path):
    code, out, err = export(capsys, checkpoints / "groups.safetensors", "compact", tmp_path / "c.safetensors")
    assert code == 0, err
    written, _ = read_state_dict(tmp_path / "c.safetensors")
    original, _ = read_state_dict(checkpoints / "groups.safetensors")
    assert sum(t.numel() for t in written.values()) < sum(t.numel() for t in original.values())
    assert "compact:" in out and "dense / export" in out
    assert "memory format" not in out  # an MLP has no 4-D weight: not timed in either format
    pruned = workflow.setup("lenet300", "synthetic", checkpoint=checkpoints / "groups.safetensors").model.eval()
    loaded = load_compact(tmp_path / "c.safetensors", workflow.setup("lenet300", "synthetic").model.eval())
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in written.items()}
    inputs = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), pruned(inputs), rtol=1e-4, atol=1e-5)
    # the file is a checkpoint like any other: `prunekit eval` evaluates the compact model as the masked one
    code, compact_eval, err = run(capsys, "eval", *MODEL, "--checkpoint", tmp_path / "c.safetensors")
    assert code == 0, err
    code, masked_eval, err = run(capsys, "eval", *MODEL, "--checkpoint", checkpoints / "groups.safetensors")
    assert code == 0, err
    assert compact_eval.splitlines()[-1] == masked_eval.splitlines()[-1]


class SmallCNN(nn.Module):
    input_shape = (3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_a_compacted_cnn_is_timed_against_the_dense_one_each_in_its_fastest_memory_format(capsys, monkeypatch,
                                                                                           tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform")
    prunekit.make_permanent(model)
    save_model(model, tmp_path / "pruned.safetensors", {})
    inputs = torch.randn(4, 3, 16, 16)
    monkeypatch.setattr(command, "_load", lambda request: (model, inputs, "4 random images"))
    code, out, err = export(capsys, tmp_path / "pruned.safetensors", "compact", tmp_path / "c.safetensors")
    assert code == 0, err
    chosen = re.search(r"memory format: dense (\w+) [\d.]+ ms \((\w+) [\d.]+ ms\); compact (\w+) [\d.]+ ms "
                       r"\((\w+) [\d.]+ ms\)", out)
    assert chosen, out
    dense_format, compact_format = chosen.group(1), chosen.group(3)
    assert {chosen.group(1), chosen.group(2)} == {chosen.group(3), chosen.group(4)} == {CONTIGUOUS, CHANNELS_LAST}
    assert (f"each in its fastest memory format: dense ({dense_format}) " in out
            and f", export ({compact_format}) " in out), out
    _, metadata = read_state_dict(tmp_path / "c.safetensors")
    assert metadata["memory_format"] == compact_format
    loaded = load_compact(tmp_path / "c.safetensors", SmallCNN().eval())
    assert loaded.conv1.out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model(inputs), rtol=1e-4, atol=1e-5)


def test_compact_of_an_unstructured_checkpoint_is_refused_before_anything_is_written(capsys, checkpoints, tmp_path):
    line = error_line(capsys, "export", *MODEL, "--checkpoint", checkpoints / "unstructured.safetensors",
                      "--format", "compact", "--out", tmp_path / "c.safetensors")
    assert "--structure groups" in line or "--format sparse" in line
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_is_checked_in_onnxruntime(capsys, checkpoints, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is absent: pip install 'prunekit[onnx]'")
    code, out, err = export(capsys, checkpoints / "unstructured.safetensors", "onnx", tmp_path / "m.onnx")
    assert code == 0, err
    assert "checked in onnxruntime" in out and (tmp_path / "m.onnx").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{tmp}/missing.safetensors", "--format", "sparse", "--out", "{tmp}/s.safetensors"],
     "checkpoint .*missing.safetensors does not exist"),
    (["--format", "sparse", "--out", "{tmp}/s.safetensors"], "pass --checkpoint"),
    (["--checkpoint", "{ckpt}", "--format", "zip", "--out", "{tmp}/s.safetensors"], "--format zip is unknown"),
    (["--checkpoint", "{ckpt}", "--format", "sparse", "--out", "{tmp}/s.onnx"], r"name --out \*\.safetensors"),
    (["--checkpoint", "{ckpt}", "--format", "onnx", "--out", "{tmp}/m.safetensors"], r"name --out \*\.onnx"),
    (["--checkpoint", "{ckpt}", "--format", "sparse", "--out", "{tmp}"], "is a folder"),
    (["--checkpoint", "{ckpt}", "--format", "sparse", "--out", "{tmp}/no/s.safetensors"], "does not exist"),
    (["--checkpoint", "{ckpt}", "--format", "sparse", "--out", "{ckpt}"], "is the checkpoint being exported"),
    (["--checkpoint", "{ckpt}", "--format", "sparse", "--out", "{tmp}/dense.safetensors"],
     "exists and holds another kind of file"),
    (["--checkpoint", "{ckpt}", "--format", "sparse", "--out", "{tmp}/s.safetensors", "--batch-size", "0"],
     "--batch-size"),
])
def test_bad_input_is_one_line_before_the_model_is_loaded(capsys, monkeypatch, checkpoints, tmp_path, argv, message):
    shutil.copy(checkpoints / "unstructured.safetensors", tmp_path / "dense.safetensors")  # a dense checkpoint
    before = sorted(tmp_path.iterdir())
    monkeypatch.setattr(workflow, "setup", started_work)
    ckpt = checkpoints / "unstructured.safetensors"
    line = error_line(capsys, "export", *MODEL, *(arg.format(tmp=tmp_path, ckpt=ckpt) for arg in argv))
    assert re.search(message, line), line
    assert sorted(tmp_path.iterdir()) == before


def test_onnx_without_the_extra_names_it_before_the_model_is_loaded(capsys, monkeypatch, checkpoints, tmp_path):
    real_import = builtins.__import__

    def without_onnx(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "onnx" and level == 0:  # the package, not prunekit.export.onnx
            raise ImportError("No module named 'onnx'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", without_onnx)
    monkeypatch.setattr(workflow, "setup", started_work)
    line = error_line(capsys, "export", *MODEL, "--checkpoint", checkpoints / "unstructured.safetensors",
                      "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert "pip install 'prunekit[onnx]'" in line and list(tmp_path.iterdir()) == []


def test_a_hugging_face_folder_exports_timed_on_random_tokens(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=160)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    assert main(["prune", "--model", str(tmp_path / "bert"), "--sparsity", "0.9", "--out",
                 str(tmp_path / "pruned.safetensors")]) == 0
    code, out, err = run(capsys, "export", "--model", tmp_path / "bert", "--checkpoint",
                         tmp_path / "pruned.safetensors", "--format", "sparse", "--out", tmp_path / "s.safetensors",
                         "--batch-size", "2")
    assert code == 0, err
    assert "2 × 128 random tokens" in out
    written, _ = read_state_dict(tmp_path / "s.safetensors")
    pruned, _ = read_state_dict(tmp_path / "pruned.safetensors")
    assert all(torch.equal(written[key], tensor) for key, tensor in pruned.items())


def test_a_compacted_hugging_face_folder_states_its_config_and_loads_back(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    from prunekit.models.hf import load_model_folder

    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=160)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    model = load_model_folder(tmp_path / "bert")
    tokens = {"input_ids": torch.randint(0, 96, (2, 16))}
    prunekit.prune(model, "magnitude", 0.5, [tokens], structure="groups", budget="uniform", loss="distill")
    prunekit.make_permanent(model)
    save_model(model, tmp_path / "pruned.safetensors", {})
    code, out, err = run(capsys, "export", "--model", tmp_path / "bert", "--checkpoint",
                         tmp_path / "pruned.safetensors", "--format", "compact", "--out", tmp_path / "c.safetensors",
                         "--batch-size", "2")
    assert code == 0, err
    assert "config: intermediate_size = 32" in out and "load_compact" in out, out
    assert "memory format" not in out  # no 4-D weight: not timed
    loaded = load_compact(tmp_path / "c.safetensors", load_model_folder(tmp_path / "bert"))
    assert loaded.config.intermediate_size == 32 and loaded.encoder.layer[0].intermediate.dense.out_features == 32
    with torch.no_grad():
        torch.testing.assert_close(loaded(**tokens).last_hidden_state, model(**tokens).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)
