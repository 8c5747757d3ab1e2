"""Sparse weight files: bit-exact round trips under each encoding, the size bound at 90%, damaged files refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import prunekit
from prunekit.checkpoints import load_state_dict_into, read_state_dict, save_model
from prunekit.errors import PrunekitError
from prunekit.export import load_sparse, save_sparse
from prunekit.export.sparse_files import LAYOUT_KEY, SPARSE_FILE_FORMAT, decode_sparse, encode_tensor
from prunekit.models import create_model


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def sparse_tensor(sparsity: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(64, 50, generator=generator)
    tensor[torch.rand(64, 50, generator=generator) < sparsity] = 0.0
    return tensor


def pruned_mlpnet(sparsity: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("mlpnet")
    prunekit.prune(model, "magnitude", sparsity)
    return prunekit.make_permanent(model)


@pytest.mark.parametrize("sparsity, encoding", [(0.0, "dense"), (0.5, "bitmask"), (0.99, "indices")])
def test_each_encoding_round_trips_every_bit_including_negative_zero_and_nan(sparsity, encoding):
    tensor = sparse_tensor(sparsity)
    tensor[0, :3] = torch.tensor([-0.0, float("nan"), float("-inf")])  # kept: their bits are not all zero
    chosen, parts = encode_tensor(tensor)
    assert chosen == encoding
    stored = {"w" + suffix: part for suffix, part in parts.items()}
    layout = {"w": {"encoding": chosen, "shape": [64, 50], "dtype": "float32"}}
    state, _ = decode_sparse(stored, {LAYOUT_KEY: json.dumps(layout)}, "x.safetensors")
    assert torch.equal(bits(state["w"]), bits(tensor))


def test_make_permanent_then_sparse_save_loads_back_bit_exactly_into_a_fresh_model(tmp_path):
    model = pruned_mlpnet(0.9)
    report = save_sparse(model, tmp_path / "sparse.safetensors", {"note": "x"})
    fresh = create_model("mlpnet")
    metadata = load_sparse(fresh, tmp_path / "sparse.safetensors")
    assert metadata["note"] == "x" and metadata["format"] == SPARSE_FILE_FORMAT
    assert set(report.encodings.values()) <= {"bitmask", "indices", "dense"}
    for key, tensor in model.state_dict().items():
        assert torch.equal(bits(fresh.state_dict()[key]), bits(tensor)), key


def test_a_masked_model_saves_as_its_permanent_form_and_stays_masked(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlpnet")
    prunekit.prune(model, "magnitude", 0.9)
    save_sparse(model, tmp_path / "sparse.safetensors")
    assert prunekit.masks.get_masks(model)  # saved from a copy
    state, _ = read_state_dict(tmp_path / "sparse.safetensors")
    permanent = prunekit.make_permanent(model)
    for key, tensor in permanent.state_dict().items():
        assert torch.equal(bits(state[key]), bits(tensor)), key


def test_sparse_file_at_90_percent_is_at_most_a_quarter_of_the_dense_file(tmp_path):
    model = pruned_mlpnet(0.9)
    save_model(model, tmp_path / "dense.safetensors", {})
    report = save_sparse(model, tmp_path / "sparse.safetensors")
    assert report.file_bytes <= 0.25 * (tmp_path / "dense.safetensors").stat().st_size


def test_every_checkpoint_reader_decodes_a_sparse_file(tmp_path):
    model = pruned_mlpnet(0.9)
    save_sparse(model, tmp_path / "sparse.safetensors")
    state, _ = read_state_dict(tmp_path / "sparse.safetensors")
    fresh = create_model("mlpnet")
    load_state_dict_into(fresh, state)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(fresh(x), model(x))


def test_a_sparse_file_must_be_named_safetensors(tmp_path):
    with pytest.raises(PrunekitError, match=r"name it \*\.safetensors, not w\.pt"):
        save_sparse(pruned_mlpnet(0.5), tmp_path / "w.pt")


def test_load_sparse_refuses_a_dense_checkpoint(tmp_path):
    model = pruned_mlpnet(0.5)
    save_model(model, tmp_path / "dense.safetensors", {})
    with pytest.raises(PrunekitError, match="not a prunekit sparse weight file"):
        load_sparse(model, tmp_path / "dense.safetensors")


def write_damaged(path, tensors, layout) -> None:
    save_file(tensors, str(path), metadata={"format": SPARSE_FILE_FORMAT, LAYOUT_KEY: json.dumps(layout)})


@pytest.mark.parametrize("change, message", [
    (lambda t, l: t.__setitem__("w::values", t["w::values"][1:]), "stored positions but"),
    (lambda t, l: t.__setitem__("w::indices", t["w::indices"].flip(0)), "not increasing positions"),
    (lambda t, l: t.__setitem__("w::indices", t["w::indices"] + 10_000), "not increasing positions"),
    (lambda t, l: t.pop("w::values"), r"lacks its part 'w::values'"),
    (lambda t, l: l["w"].update(encoding="zip"), "encoding 'zip'"),
    (lambda t, l: t.__setitem__("extra", torch.zeros(1)), "does not name"),
])
def test_damaged_sparse_files_are_refused_in_one_line_naming_the_tensor(tmp_path, change, message):
    _, parts = encode_tensor(sparse_tensor(0.99))
    tensors = {"w" + suffix: part for suffix, part in parts.items()}
    layout = {"w": {"encoding": "indices", "shape": [64, 50], "dtype": "float32"}}
    change(tensors, layout)
    write_damaged(tmp_path / "bad.safetensors", tensors, layout)
    with pytest.raises(PrunekitError, match=message) as caught:
        read_state_dict(tmp_path / "bad.safetensors")
    assert "\n" not in str(caught.value) and "write it again" in str(caught.value)


def test_a_file_that_is_not_safetensors_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "pickle.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(PrunekitError, match="not a valid safetensors file"):
        load_sparse(create_model("mlpnet"), path)


def test_a_missing_layout_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bad.safetensors"), metadata={"format": SPARSE_FILE_FORMAT})
    with pytest.raises(PrunekitError, match=f"{LAYOUT_KEY}' is missing"):
        read_state_dict(tmp_path / "bad.safetensors")


def test_make_permanent_leaves_every_pruned_weight_as_all_zero_bits():
    model = pruned_mlpnet(0.9)
    weight = model.fc1.weight.detach()
    zeros = weight == 0
    assert zeros.any() and not bits(weight[zeros]).any()  # +0.0, never -0.0
