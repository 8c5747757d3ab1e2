"""ONNX export: onnxruntime's outputs equal PyTorch's within 1e-5 relative; bad input refused before any file."""
from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.export import compact
from prunekit.export import onnx as onnx_export
from prunekit.export.onnx import export_onnx, require_onnx, session

pytest.importorskip("onnxruntime", reason="the onnx extra is absent: pip install 'prunekit[onnx]' (make test has it)")


def pruned_permanent(model: nn.Module, sparsity: float = 0.9) -> nn.Module:
    prunekit.prune(model, "magnitude", sparsity)
    return prunekit.make_permanent(model).eval()


def test_a_pruned_model_made_permanent_exports_with_outputs_equal_to_pytorch(tiny_net, tmp_path):
    model = pruned_permanent(tiny_net)
    x = torch.randn(4, 3, 8, 8)
    result = export_onnx(model, x, tmp_path / "tiny.onnx")
    assert result.relative_error <= 1e-5 and result.outputs == 1
    other = torch.randn(7, 3, 8, 8)  # another batch size: the batch dimension is not fixed
    produced = session(result.path).run(None, {"x": other.numpy()})[0]
    with torch.no_grad():
        expected = model(other).numpy()
    assert np.abs(produced - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_transformer_with_keyword_inputs_exports_every_output(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = pruned_permanent(transformers.BertModel(config))
    batch = {"input_ids": torch.randint(0, 96, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    result = export_onnx(model, batch, tmp_path / "bert.onnx")
    assert result.relative_error <= 1e-5 and result.outputs == 2  # last hidden state and pooled output


def test_a_model_with_masks_attached_is_refused(tiny_net, tmp_path):
    prunekit.prune(tiny_net, "magnitude", 0.5)
    with pytest.raises(PrunekitError, match="make_permanent"):
        export_onnx(tiny_net, torch.randn(2, 3, 8, 8), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_an_onnx_file_must_be_named_onnx(tiny_net, tmp_path):
    with pytest.raises(PrunekitError, match=r"\*\.onnx, not x\.bin"):
        export_onnx(tiny_net, torch.randn(2, 3, 8, 8), tmp_path / "x.bin")


def test_outputs_that_differ_leave_no_file(tiny_net, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "compare_with_onnxruntime", lambda *args: (1e-3, 1))
    with pytest.raises(PrunekitError, match="differ from PyTorch's by 1.00e-03 relative"):
        export_onnx(tiny_net.eval(), torch.randn(2, 3, 8, 8), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_extra_is_named_with_its_install_command(monkeypatch):
    real_import = builtins.__import__

    def without_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    with pytest.raises(PrunekitError, match=r"needs onnxruntime, .*pip install 'prunekit\[onnx\]'"):
        require_onnx()


def test_a_model_the_exporter_cannot_trace_is_refused_in_one_line(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0].sum().reshape(1) if float(x.sum()) > 0 else x  # Python control flow on a value

    with pytest.raises(PrunekitError, match="could not export DataDependent") as caught:
        export_onnx(DataDependent(), torch.randn(3), tmp_path / "x.onnx")
    assert "\n" not in str(caught.value) and not (tmp_path / "x.onnx").exists()


def test_a_compacted_model_exports_with_outputs_equal_to_pytorch(tmp_path):
    from prunekit.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20")
    prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform")
    x = torch.randn(4, 3, 32, 32)
    compacted = compact(model, x).eval()
    assert sum(p.numel() for p in compacted.parameters()) < sum(p.numel() for p in model.parameters())
    result = export_onnx(compacted, x, tmp_path / "compact.onnx")
    assert result.relative_error <= 1e-5
