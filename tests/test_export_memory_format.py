"""The memory format decision (`fastest_memory_format`): channels_last only where measured faster, the same outputs
in either format with contiguous inputs, models without 4-D weights not timed, files always contiguous."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.checkpoints import read_state_dict, save_model
from prunekit.export import compact, fastest_memory_format, load_compact, save_compact, to_memory_format
from prunekit.export.memory_format import CHANNELS_LAST, CONTIGUOUS, memory_format_of
from prunekit.models.zoo import create_model

from test_compaction import with_random_statistics

CNNS = [("resnet20", {}), ("resnet20", {"shortcut": "identity"}), ("mobilenet_v1", {}), ("vgg16_bn", {})]


def images(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def fake_timer(seconds: dict[str, float]):
    """A timer that reports the given seconds per format and records that it was asked."""
    def timer(what, candidates):
        timer.calls.append(sorted(candidates))
        for run in candidates.values():
            run()
        return {label: seconds[label] for label in candidates}
    timer.calls = []
    return timer


def refusing_timer(what, candidates):
    raise AssertionError("a model without 4-D weights was timed")


@pytest.mark.parametrize("name, options", CNNS)
def test_channels_last_weights_with_contiguous_inputs_give_the_same_outputs(name, options):
    model = with_random_statistics(create_model(name, **options)).eval()
    inputs = images()
    with torch.no_grad():
        expected = model(inputs)
        converted = to_memory_format(model, CHANNELS_LAST)
        got = converted(inputs)  # inputs left contiguous: the first convolution follows its weight
    assert memory_format_of(converted) == CHANNELS_LAST and inputs.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * max(1.0, float(expected.abs().max())))


@pytest.mark.parametrize("measured, chosen", [
    ({CONTIGUOUS: 2.0, CHANNELS_LAST: 1.0}, CHANNELS_LAST),
    ({CONTIGUOUS: 1.0, CHANNELS_LAST: 2.0}, CONTIGUOUS),
    ({CONTIGUOUS: 1.0, CHANNELS_LAST: 1.0}, CONTIGUOUS),  # a tie keeps the format the model had
])
def test_the_faster_format_is_chosen_and_never_a_slower_one(measured, chosen):
    model = create_model("resnet20").eval()
    inputs = images()
    with torch.no_grad():
        expected = model(inputs)
    timer = fake_timer(measured)
    choice = fastest_memory_format(model, inputs, timer=timer)
    assert timer.calls == [[CHANNELS_LAST, CONTIGUOUS]]
    assert choice.chosen == chosen == memory_format_of(model) and choice.before == CONTIGUOUS
    assert choice.seconds[choice.chosen] <= min(measured.values()) and choice.speedup >= 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), expected, rtol=0, atol=1e-5)


def test_a_channels_last_model_goes_back_to_contiguous_when_that_is_faster_and_stays_on_a_tie():
    model = to_memory_format(create_model("resnet20").eval(), CHANNELS_LAST)
    fastest_memory_format(model, images(), timer=fake_timer({CONTIGUOUS: 1.0, CHANNELS_LAST: 1.0}))
    assert memory_format_of(model) == CHANNELS_LAST
    choice = fastest_memory_format(model, images(), timer=fake_timer({CONTIGUOUS: 1.0, CHANNELS_LAST: 3.0}))
    assert (choice.before, choice.chosen, memory_format_of(model)) == (CHANNELS_LAST, CONTIGUOUS, CONTIGUOUS)
    assert choice.speedup == 3.0


def test_a_measured_choice_on_the_real_clock_keeps_the_outputs():
    model = create_model("mobilenet_v1").eval()
    inputs = images(8)
    with torch.no_grad():
        expected = model(inputs)
    choice = fastest_memory_format(model, inputs)
    assert set(choice.seconds) == {CONTIGUOUS, CHANNELS_LAST}
    assert choice.seconds[choice.chosen] == min(choice.seconds.values())
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), expected, rtol=0, atol=1e-5 * max(1.0, float(expected.abs().max())))


def test_models_without_4d_weights_are_left_alone_without_timing():
    mlp = create_model("mlpnet")
    choice = fastest_memory_format(mlp, torch.randn(2, 1, 28, 28), timer=refusing_timer)
    assert (choice.chosen, choice.seconds) == (CONTIGUOUS, {}) and "not timed" in str(choice)
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertModel(config).eval()
    choice = fastest_memory_format(bert, {"input_ids": torch.randint(0, 96, (2, 8))}, timer=refusing_timer)
    assert choice.chosen == CONTIGUOUS and choice.seconds == {}


class Viewing(nn.Module):
    """Flattens with `.view`, which channels_last activations cannot take."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.fc(x.view(x.shape[0], -1))


def test_a_format_the_model_cannot_run_in_is_not_a_candidate():
    model = Viewing().eval()
    choice = fastest_memory_format(model, torch.randn(2, 3, 8, 8), timer=refusing_timer)
    assert choice.chosen == CONTIGUOUS == memory_format_of(model) and "channels_last fails" in str(choice)


def test_timing_runs_in_eval_mode_and_leaves_the_mode_and_statistics_as_they_were():
    model = create_model("resnet20").train()
    statistics = model.bn1.running_mean.clone()
    fastest_memory_format(model, images(), timer=fake_timer({CONTIGUOUS: 2.0, CHANNELS_LAST: 1.0}))
    assert model.training and torch.equal(model.bn1.running_mean, statistics)


def test_a_channels_last_model_saves_contiguous_and_loads_back(tmp_path):
    model = with_random_statistics(create_model("resnet20")).eval()
    to_memory_format(model, CHANNELS_LAST)
    save_model(model, tmp_path / "cl.safetensors", {})
    state, _ = read_state_dict(tmp_path / "cl.safetensors")
    assert all(tensor.is_contiguous() for tensor in state.values())
    fresh = create_model("resnet20").eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images()), model(images()), rtol=0, atol=1e-5)


def test_a_compact_file_records_the_chosen_format_and_loading_applies_it(tmp_path):
    dense = with_random_statistics(create_model("resnet20")).eval()
    masked = create_model("resnet20").eval()
    masked.load_state_dict(dense.state_dict())
    prunekit.prune(masked, "magnitude", 0.5, structure="groups", budget="uniform")
    compacted = compact(masked, images(2))
    fastest_memory_format(compacted, images(), timer=fake_timer({CONTIGUOUS: 2.0, CHANNELS_LAST: 1.0}))
    save_compact(compacted, dense, tmp_path / "c.safetensors")
    state, metadata = read_state_dict(tmp_path / "c.safetensors")
    assert metadata["memory_format"] == CHANNELS_LAST and all(t.is_contiguous() for t in state.values())
    loaded = load_compact(tmp_path / "c.safetensors", create_model("resnet20").eval())
    assert memory_format_of(loaded) == CHANNELS_LAST
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), compacted(images()), rtol=0, atol=1e-5)
