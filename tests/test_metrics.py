"""MACs of Conv/Linear layers, dense and with masks, checked by hand on small models."""
import torch
from torch import nn

from prunekit import prune
from prunekit.masks import attach_masks
from prunekit.metrics import count_macs


class ConvThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)          # 2×1×3×3 = 18 weights, 4×4 = 16 output positions
        self.strided = nn.Conv2d(2, 4, 2, stride=2, groups=2, bias=False)  # 4×1×2×2 = 16 weights, 2×2 positions
        self.fc = nn.Linear(16, 3)                          # 48 weights, one position

    def forward(self, x):
        x = self.strided(torch.relu(self.conv(x)))
        return self.fc(x.flatten(1))


def test_dense_macs_by_hand():
    macs = count_macs(ConvThenLinear(), (1, 4, 4))
    assert {layer.name: layer.dense for layer in macs.layers} == {
        "conv.weight": 18 * 16,   # each output pixel of each filter: 9 MACs; 2 filters × 16 pixels
        "strided.weight": 16 * 4,  # grouped: each of 4 filters sees 1 channel × 2×2 at 2×2 positions
        "fc.weight": 48,
    }
    assert macs.dense == macs.masked == 288 + 64 + 48
    assert macs.speedup == 1.0


def test_masked_macs_count_nonzero_weights_only():
    model = ConvThenLinear()
    conv_mask = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    conv_mask[0] = True  # keep one filter: 9 of 18 weights
    fc_mask = torch.zeros(3, 16, dtype=torch.bool)
    fc_mask[:, :4] = True  # 12 of 48 weights
    attach_masks(model, {"conv.weight": conv_mask, "fc.weight": fc_mask})
    macs = count_macs(model, (1, 4, 4))
    assert {layer.name: layer.masked for layer in macs.layers} == {
        "conv.weight": 9 * 16, "strided.weight": 16 * 4, "fc.weight": 12}
    assert macs.dense == 400
    assert macs.speedup == 400 / (144 + 64 + 12)


def test_macs_follow_a_real_prune_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model.train()
    prune(model, "magnitude", 0.75, budget="uniform")
    macs = count_macs(model, (1, 8, 8))
    assert macs.dense == 64 * 32 + 32 * 10
    assert macs.masked == 64 * 32 // 4 + 32 * 10 // 4  # uniform 75%: exact counts per layer
    assert model.training  # the eval-mode pass restored the mode


def test_a_module_called_twice_counts_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x.flatten(1)))

    assert count_macs(Twice(), (1, 2, 2)).dense == 2 * 16


def test_transformers_conv1d_counts_its_in_by_out_weight_once_per_token():
    from test_targets import Conv1D

    model = nn.Sequential(Conv1D(nf=3, nx=4))
    with torch.no_grad():
        model[0].weight[:2] = 0  # 2 of the 4 inputs gone: 6 of 12 weights
    macs = count_macs(model, (5, 4))  # 5 tokens of 4 features
    assert [(layer.name, layer.dense, layer.masked) for layer in macs.layers] == [("0.weight", 12 * 5, 6 * 5)]


class TokenModel(nn.Module):
    """Hugging Face style: called with a mapping (`model(**batch)`), token ids embedded, one Linear per token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.embed(input_ids)) * attention_mask.unsqueeze(-1)


def test_a_mapping_batch_of_one_is_counted_per_token_and_a_tensor_example_like_its_shape():
    example = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    macs = count_macs(TokenModel(), example)
    assert [(layer.name, layer.dense) for layer in macs.layers] == [("fc.weight", 12 * 5)]  # the lookup: no MACs
    model = ConvThenLinear()
    assert count_macs(model, torch.zeros(1, 1, 4, 4)) == count_macs(model, (1, 4, 4))
