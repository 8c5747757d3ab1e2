"""Atomic writes: a write that fails half-way leaves the previous file as it was, and no temporary file."""
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit import checkpoints, masks
from prunekit.checkpoints import read_state_dict, save_model
from prunekit.io import atomic_path
from prunekit.masks import read_masks


class DiskFull(OSError):
    pass


def write_half_then_fail(tensors, filename, metadata=None):
    """Stands in for safetensors' save_file: starts the file, then the disk fills up."""
    Path(filename).write_bytes(b"\x00" * 64)
    raise DiskFull("no space left on device")


def test_a_block_failing_half_way_leaves_the_previous_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous content")
    with pytest.raises(DiskFull), atomic_path(target) as temporary:
        temporary.write_bytes(b"half of the new")
        raise DiskFull("no space left on device")
    assert target.read_bytes() == b"previous content"
    assert list(tmp_path.iterdir()) == [target]


def test_a_mask_file_failing_half_way_leaves_the_previous_masks(tiny_net, tmp_path, monkeypatch):
    path = tmp_path / "masks.safetensors"
    previous = prunekit.prune(tiny_net, "magnitude", 0.5).masks
    prunekit.save_masks(tiny_net, path)
    prunekit.prune(tiny_net, "magnitude", 0.9)
    monkeypatch.setattr(masks, "save_file", write_half_then_fail)
    with pytest.raises(DiskFull):
        prunekit.save_masks(tiny_net, path)
    stored = read_masks(path)[0]
    assert all(torch.equal(stored[name], mask) for name, mask in previous.items())
    assert list(tmp_path.iterdir()) == [path]


def test_weights_failing_half_way_leave_the_previous_weights(tiny_net, tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    save_model(tiny_net, path, {"epoch": 1})
    before = read_state_dict(path)
    with torch.no_grad():
        tiny_net.fc.weight.zero_()
    monkeypatch.setattr(checkpoints, "save_file", write_half_then_fail)
    with pytest.raises(DiskFull):
        save_model(tiny_net, path, {"epoch": 2})
    state, metadata = read_state_dict(path)
    assert metadata == before[1] and all(torch.equal(state[key], before[0][key]) for key in state)
    assert list(tmp_path.iterdir()) == [path]


def test_written_files_and_folders_get_the_umasks_mode_not_a_temporary_files(tmp_path):
    import os
    from prunekit.io import atomic_folder, atomic_path
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "file.bin") as partial:
            partial.write_bytes(b"x")
        with atomic_folder(tmp_path / "folder") as partial:
            (partial / "inside").write_bytes(b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "file.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
