"""Checkpoints: safe reading, key-layout normalisation, strict fitting onto zoo models, safetensors round trips."""
from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from prunekit.checkpoints import (
    load_pretrained,
    load_state_dict_into,
    normalize_state_dict,
    read_state_dict,
    save_model,
)
from conftest import SHARED, require_path
from prunekit.errors import PrunekitError
from prunekit.models import create_model

SHARED_CHECKPOINTS = SHARED / "checkpoints"
MLPNET_CHECKPOINT = "woodfisher/mnist_25_epoch_93.97.ckpt"
RESNET20_CHECKPOINT = "woodfisher/resnet20_cifar10.pth.tar"


def shared_checkpoint(relative: str) -> Path:
    """A shared checkpoint's path; skips when it is absent, except under CI where that is a failure."""
    return require_path(SHARED_CHECKPOINTS / relative, "the shared checkpoints live in ../shared/checkpoints")


class PickledCustomObject:
    """Stands in for any class a checkpoint might pickle (e.g. a whole model or a config object)."""


class MaskParametrization(nn.Module):
    """A minimal `weight * mask` parametrization with the mask as buffer `mask`."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def seeded_mlpnet(seed: int) -> nn.Module:
    """An MLPNet with reproducible random weights."""
    torch.manual_seed(seed)
    return create_model("mlpnet")


def masked_mlpnet(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """An MLPNet whose fc1.weight is parametrized by a random 0/1 mask, and that mask."""
    model = seeded_mlpnet(seed)
    mask = (torch.rand(40, 784) > 0.5).float()
    parametrize.register_parametrization(model.fc1, "weight", MaskParametrization(mask))
    return model, mask


# --- the shared checkpoints -------------------------------------------------------------------------------


def test_woodfisher_mlpnet_loads_with_exact_weights_and_mnist_normalization() -> None:
    path = shared_checkpoint(MLPNET_CHECKPOINT)
    model, metadata = load_pretrained("mlpnet", path)
    with torch.serialization.safe_globals([torch.optim.SGD, torch.optim.lr_scheduler.ExponentialLR]):
        raw = torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
    for layer in ("fc1", "fc2", "fc3"):
        assert torch.equal(getattr(model, layer).weight, raw[f"module.{layer}._layer.weight"])
    assert metadata["normalization"] == ((0.1307,), (0.3081,))
    assert metadata["model_config"]["arch"] == "mlpnet"
    assert torch.isfinite(model(torch.rand(4, 1, 28, 28))).all()


def test_distiller_resnet20_loads_every_tensor_with_half_normalization() -> None:
    path = shared_checkpoint(RESNET20_CHECKPOINT)
    model, metadata = load_pretrained("resnet20", path)
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(key.removeprefix("module.") for key in raw)
    assert all(torch.equal(loaded[key.removeprefix("module.")], tensor) for key, tensor in raw.items())
    assert metadata["arch"] == "resnet20_cifar" and metadata["epoch"] == 136
    assert metadata["normalization"] == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert "optimizer" not in metadata


def test_shared_checkpoint_for_the_wrong_model_suggests_the_right_one() -> None:
    with pytest.raises(PrunekitError, match=r"72 missing.*layer1\.3\.conv1\.weight.*--model resnet20") as refused:
        load_pretrained("resnet32", shared_checkpoint(RESNET20_CHECKPOINT))
    assert "\n" not in str(refused.value)


# --- reading files ---------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.pt"
    with pytest.raises(PrunekitError, match="absent.pt does not exist"):
        read_state_dict(path)


def test_pickled_custom_class_is_refused_with_conversion_advice(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "config": PickledCustomObject()}, path)
    with pytest.raises(PrunekitError, match="would need arbitrary unpickling") as refused:
        read_state_dict(path)
    message = str(refused.value)
    assert "PickledCustomObject" in message and "refuses" in message and "state_dict()" in message


class CreatesFileWhenUnpickled:
    """A payload whose unpickling calls the builtin open(path, "w"): the kind of code a checkpoint can smuggle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return builtins.open, (str(self.path), "w")


@pytest.mark.parametrize("zipfile", [False, True], ids=["legacy-pickle", "zip"])
def test_code_in_a_pickled_checkpoint_is_refused_without_running_it(tmp_path: Path, zipfile: bool) -> None:
    live, marker = tmp_path / "live.pt", tmp_path / "marker"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": CreatesFileWhenUnpickled(tmp_path / "control")}, live,
               _use_new_zipfile_serialization=zipfile)
    torch.load(live, weights_only=False)  # the control: full unpickling does run the payload
    assert (tmp_path / "control").exists()
    path = tmp_path / "payload.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": CreatesFileWhenUnpickled(marker)}, path,
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(PrunekitError, match="would need arbitrary unpickling.*refuses"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"not a checkpoint", "cannot be read as weights only .*Unsupported operand"),
    (b"hello world", "not a readable torch checkpoint"),
    (b"", "not a readable torch checkpoint"),
])
def test_garbage_file_is_not_a_checkpoint(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(PrunekitError, match=message):
        read_state_dict(path)


def test_corrupt_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(PrunekitError, match="not a valid safetensors file"):
        read_state_dict(path)


@pytest.mark.parametrize("nesting", ["state_dict", "model_state_dict", "model", None])
def test_torch_file_state_dict_is_found_where_training_scripts_put_it(tmp_path: Path, nesting: str | None) -> None:
    state = {"fc.weight": torch.randn(3, 2)}
    training_state = {"epoch": 7, "arch": "x", "optimizer": {"state": torch.ones(1)}}
    content = state if nesting is None else {nesting: state, **training_state}
    torch.save(content, tmp_path / "ckpt.pt")
    loaded, metadata = read_state_dict(tmp_path / "ckpt.pt")
    assert torch.equal(loaded["fc.weight"], state["fc.weight"])
    assert metadata == ({} if nesting is None else {"epoch": 7, "arch": "x"})


def test_torch_file_without_a_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save({"weights": [torch.ones(1)], "epoch": 1}, tmp_path / "odd.pt")
    with pytest.raises(PrunekitError, match="not a state dict"):
        read_state_dict(tmp_path / "odd.pt")


def test_save_model_round_trips_tensors_and_metadata(tmp_path: Path) -> None:
    model = seeded_mlpnet(0)
    path = tmp_path / "model.safetensors"
    save_model(model, path, {"arch": "mlpnet", "epoch": 3, "normalization": [[0.1], [0.3]]})
    state, metadata = read_state_dict(path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[key], tensor) for key, tensor in model.state_dict().items())
    assert metadata == {"arch": "mlpnet", "epoch": "3", "normalization": "[[0.1], [0.3]]"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_save_model_refuses_other_suffixes_and_unencodable_metadata(tmp_path: Path) -> None:
    with pytest.raises(PrunekitError, match=r"\*\.safetensors"):
        save_model(seeded_mlpnet(0), tmp_path / "model.pt", {})
    with pytest.raises(PrunekitError, match="metadata 'when'"):
        save_model(seeded_mlpnet(0), tmp_path / "model.safetensors", {"when": object()})
    assert not list(tmp_path.iterdir())


def test_load_pretrained_takes_normalization_from_safetensors_metadata(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(seeded_mlpnet(0), path, {"normalization": [[0.2], [0.4]]})
    _, metadata = load_pretrained("mlpnet", path)
    assert metadata["normalization"] == ((0.2,), (0.4,))
    save_file({"fc1.weight": torch.zeros(40, 784)}, str(path))
    with pytest.raises(PrunekitError, match="missing from the checkpoint: fc2.weight"):
        load_pretrained("mlpnet", path)


def test_unknown_checkpoint_has_no_normalization(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(seeded_mlpnet(0), path, {"arch": "mine"})
    assert load_pretrained("mlpnet", path)[1]["normalization"] is None


# --- fitting state dicts onto models -----------------------------------------------------------------------


def test_woodfisher_layout_is_normalised_and_masks_are_applied() -> None:
    weight, mask = torch.randn(3, 4), (torch.rand(3, 4) > 0.5).float()
    state = {"module.fc._layer.weight": weight, "module.fc._weight_mask": mask,
             "module.out._layer.weight": weight, "module.out._weight_mask": torch.ones(3, 4)}
    normalized = normalize_state_dict(state)
    assert normalized.keys() == {"fc.weight", "out.weight"}
    assert torch.equal(normalized["fc.weight"], weight * mask)
    assert torch.equal(normalized["out.weight"], weight)


def test_wrong_keys_are_named_before_anything_is_copied() -> None:
    model, source = seeded_mlpnet(0), seeded_mlpnet(1).state_dict()
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    state = {"classifier.weight" if key == "fc3.weight" else key: tensor for key, tensor in source.items()}
    with pytest.raises(PrunekitError) as refused:
        load_state_dict_into(model, state)
    message = str(refused.value)
    assert "1 missing from the checkpoint: fc3.weight" in message
    assert "1 unexpected in the checkpoint: classifier.weight" in message
    assert "match no zoo model" in message and "\n" not in message
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in before.items())


def test_shape_mismatch_is_named_with_both_shapes() -> None:
    state = seeded_mlpnet(1).state_dict()
    listed = r"fc3\.weight \(checkpoint \(10, 20\), model \(5, 20\)\).*mlpnet"
    with pytest.raises(PrunekitError, match=listed) as refused:
        load_state_dict_into(create_model("mlpnet", num_classes=5), state)
    assert "\n" not in str(refused.value)


def test_many_mismatches_are_listed_five_at_a_time_with_counts() -> None:
    state = {f"extra{i}.weight": torch.ones(1) for i in range(8)}
    listed = r"8 unexpected in the checkpoint: (extra\d\.weight, ){4}extra4\.weight, \.\.\. \(3 more\)"
    with pytest.raises(PrunekitError, match=listed):
        load_state_dict_into(seeded_mlpnet(0), state)


def test_non_strict_loading_skips_missing_and_unexpected_keys() -> None:
    model, source = seeded_mlpnet(0), seeded_mlpnet(1).state_dict()
    load_state_dict_into(model, {"fc1.weight": source["fc1.weight"], "extra": torch.ones(1)}, strict=False)
    assert torch.equal(model.fc1.weight, source["fc1.weight"])


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(bad_value: float) -> None:
    model, state = seeded_mlpnet(0), seeded_mlpnet(1).state_dict()
    state["fc2.weight"][3, 4] = bad_value
    with pytest.raises(PrunekitError, match="fc2.weight holds 1 NaN/Inf"):
        load_state_dict_into(model, state)
    assert torch.isfinite(model.fc2.weight).all()


def test_plain_state_goes_into_parametrized_weights_and_keeps_the_model_mask() -> None:
    model, mask = masked_mlpnet(0)
    source = seeded_mlpnet(1).state_dict()
    load_state_dict_into(model, source)
    assert torch.equal(model.fc1.parametrizations.weight.original, source["fc1.weight"])
    assert torch.equal(model.fc1.parametrizations.weight[0].mask, mask)
    assert torch.equal(model.fc1.weight, source["fc1.weight"] * mask)


def test_parametrized_state_loads_into_parametrized_model_mask_included() -> None:
    source, mask = masked_mlpnet(1)
    model, _ = masked_mlpnet(0)
    load_state_dict_into(model, source.state_dict())
    assert torch.equal(model.fc1.parametrizations.weight[0].mask, mask)
    assert torch.equal(model.fc1.weight, source.fc1.weight)


def test_parametrized_state_folds_its_mask_into_a_plain_model() -> None:
    source, mask = masked_mlpnet(1)
    model = seeded_mlpnet(0)
    load_state_dict_into(model, source.state_dict())
    assert torch.equal(model.fc1.weight, source.fc1.parametrizations.weight.original * mask)
    assert torch.equal(model.fc2.weight, source.fc2.weight)


def test_save_model_writes_the_plain_weights_of_a_parametrized_model(tmp_path: Path) -> None:
    model, mask = masked_mlpnet(0)
    save_model(model, tmp_path / "pruned.safetensors", {})
    state, _ = read_state_dict(tmp_path / "pruned.safetensors")
    assert sorted(state) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert torch.equal(state["fc1.weight"], model.fc1.weight)
    assert int((state["fc1.weight"] == 0).sum()) >= int((mask == 0).sum())


def test_saving_the_weights_of_a_masked_model_leaves_its_masks_in_place(tmp_path: Path) -> None:
    import prunekit
    from prunekit import workflow
    from prunekit.checkpoints import read_state_dict
    from prunekit.masks import get_masks

    setup = workflow.setup("lenet300", "digits")
    prunekit.prune(setup.model, "magnitude", 0.5)
    workflow.save_weights(setup, tmp_path / "pruned.safetensors", {})
    assert set(get_masks(setup.model)) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    setup.model(torch.zeros(1, 64))  # the copy's fold did not delete the original's weights
    state, _ = read_state_dict(tmp_path / "pruned.safetensors")
    weights = [state[f"fc{i}.weight"] for i in (1, 2, 3)]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * sum(w.numel() for w in weights))
