"""Compact model files (`save_compact` / `load_compact`) and compacted Hugging Face configs.

A compact file loads back into the model as built before pruning, with every module's new sizes (convolutions,
option-A pads, depthwise groups, GPT-2's split_size) and the same outputs; a compacted Hugging Face model's
config states the feed-forward width every layer keeps, and what it cannot state (removed heads) is reported.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import prunekit
from prunekit.checkpoints import read_state_dict, save_model
from prunekit.errors import PrunekitError
from prunekit.export import compact, load_compact, save_compact
from prunekit.export.compact_files import COMPACT_FILE_FORMAT
from prunekit.export.hf_config import undescribed
from prunekit.models.zoo import create_model

from test_compaction import example, tiny_transformer, with_random_statistics


def shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def build(name: str, options: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return with_random_statistics(create_model(name, **options)).eval()


@pytest.mark.parametrize("name, options", [("resnet20", {"shortcut": "identity"}), ("mobilenet_v1", {}),
                                           ("lenet300", {})])
def test_a_compact_file_loads_back_into_the_model_as_built_before_pruning(tmp_path, name, options):
    dense, masked = build(name, options), build(name, options)
    prunekit.prune(masked, "magnitude", 0.5, structure="groups", budget="uniform")
    compacted = compact(masked, example(masked, 2))
    save_compact(compacted, dense, tmp_path / "c.safetensors", {"note": "test"})
    _, metadata = read_state_dict(tmp_path / "c.safetensors")
    assert metadata["format"] == COMPACT_FILE_FORMAT and metadata["note"] == "test"
    loaded = load_compact(tmp_path / "c.safetensors", create_model(name, **options).eval())
    assert shapes(loaded) == shapes(compacted) and type(loaded) is type(compacted)
    with torch.no_grad():
        torch.testing.assert_close(loaded(example(dense)), masked(example(dense)), rtol=1e-4, atol=1e-5)


def test_option_a_pads_are_recorded_as_sizes(tmp_path):
    dense, masked = build("resnet20", {"shortcut": "identity"}), build("resnet20", {"shortcut": "identity"})
    prunekit.prune(masked, "magnitude", 0.5, structure="groups", budget="uniform")
    save_compact(compact(masked, example(masked, 2)), dense, tmp_path / "c.safetensors")
    sizes = json.loads(read_state_dict(tmp_path / "c.safetensors")[1]["module_sizes"])
    assert set(sizes["layer2.0.downsample"]) == {"pad_before", "pad_after"}
    assert sizes["layer1.0.conv1"] == {"in_channels": 8, "out_channels": 8}


@pytest.mark.parametrize("kind, key, width", [("bert", "intermediate_size", 32), ("vit", "intermediate_size", 32),
                                              ("gpt2", "n_inner", 64)])  # half of 64, 64 and GPT-2's 4 × 32
def test_a_compacted_hugging_face_config_states_the_feed_forward_width_and_reports_the_heads(tmp_path, kind, key,
                                                                                             width):
    model, inputs = tiny_transformer(kind)
    dense, _ = tiny_transformer(kind)
    prunekit.prune(model, "magnitude", 0.5, [inputs], structure="groups", budget="uniform", loss="distill")
    compacted = compact(model, inputs)
    assert getattr(compacted.config, key) == width and getattr(model.config, key) == getattr(dense.config, key)
    # One head of two removed (and BERT's pooler neurons): no config of these classes describes that; the
    # feed-forward layers it does describe.
    left = undescribed(compacted)
    assert any("attn" in k or "attention" in k for k in left) and not any("intermediate" in k or "mlp" in k
                                                                          for k in left)
    save_compact(compacted, dense, tmp_path / "c.safetensors")
    loaded = load_compact(tmp_path / "c.safetensors", dense)
    assert getattr(loaded.config, key) == width and shapes(loaded) == shapes(compacted)
    if kind == "gpt2":
        assert loaded.transformer.h[0].attn.split_size == 16
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_a_config_that_describes_every_shape_round_trips_through_from_pretrained(tmp_path):
    """Llama's heads stay (its rotary embedding pins them), its feed-forward neurons go: the config says it all."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=32, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 96, (2, 10))}
    prunekit.prune(model, "magnitude", 0.5, [inputs], structure="groups", budget="uniform", loss="distill")
    compacted = compact(model, inputs)
    assert compacted.config.intermediate_size == 32 and undescribed(compacted) == []
    compacted.save_pretrained(tmp_path / "llama")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_a_file_without_module_sizes_is_refused_with_what_to_do(tmp_path):
    save_model(create_model("lenet300"), tmp_path / "dense.safetensors", {})
    with pytest.raises(PrunekitError, match="not a compact model file.*prunekit export --format compact"):
        load_compact(tmp_path / "dense.safetensors", create_model("lenet300"))


def test_a_compact_file_for_another_model_names_the_module(tmp_path):
    metadata = {"format": COMPACT_FILE_FORMAT, "module_sizes": json.dumps({"layer9.conv": {"out_channels": 2}})}
    save_file({"x": torch.zeros(1)}, str(tmp_path / "c.safetensors"), metadata=metadata)
    with pytest.raises(PrunekitError, match="resizes module 'layer9.conv', which the model has not"):
        load_compact(tmp_path / "c.safetensors", create_model("lenet300"))
