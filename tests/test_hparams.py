"""Settings declared once: checks on the fields, one checker and one message, groups composed and seen flat."""
from dataclasses import dataclass

import pytest

import prunekit
from prunekit import hparams
from prunekit.budgets import Budget
from prunekit.errors import PrunekitError
from prunekit.methods import get_method, method_fields
from prunekit.methods.bip import BipHparams
from prunekit.training import TrainConfig


@dataclass
class Inner:
    rate: float = hparams.setting(0.5, "a fraction", hparams.number(0, 1, low_open=True, high_open=True))


@dataclass
class Outer:
    count: int = hparams.setting(2, "a count", hparams.integer(1))
    inner: Inner = hparams.group(Inner, help={"rate": "the outer's rate"}, rate=0.25)


def test_flat_and_nested_spellings_build_the_same_settings_and_read_back_flat():
    flat = hparams.build(Outer, {"count": "3", "rate": "0.75"}, "thing")
    nested = hparams.build(Outer, {"count": 3, "inner": {"rate": 0.75}}, "thing")
    assert flat == nested == Outer(3, Inner(0.75))
    assert hparams.to_dict(flat) == {"count": 3, "rate": 0.75}
    assert hparams.build(Outer, {}, "thing").inner.rate == 0.25  # the group's own default for this owner


def test_described_fields_carry_the_owners_help_check_and_path():
    info = {field.name: field for field in hparams.describe(Outer)}
    assert (info["rate"].default, info["rate"].help, info["rate"].path) == (0.25, "the outer's rate", ("inner",))
    assert info["count"].flag == "--count" and info["count"].check.requirement == "an integer >= 1"


@pytest.mark.parametrize("values, message", [
    ({"count": 0}, r"^thing count=0 is invalid: set it to an integer >= 1 \(--count\)$"),
    ({"rate": 1.0}, r"^thing rate=1.0 is invalid: set it to a number in \(0, 1\) \(--rate\)$"),
    ({"inner": {"rate": 0.0}}, r"^thing rate=0.0 is invalid"),
    ({"size": 1}, r"^thing has no hyperparameter 'size'; its hyperparameters are: count, rate$"),
])
def test_every_bad_value_fails_with_the_one_message(values, message):
    with pytest.raises(PrunekitError, match=message):
        hparams.build(Outer, values, "thing")


def test_a_setting_in_two_groups_is_refused_when_declared():
    @dataclass
    class Clash:
        rate: float = hparams.setting(0.1, "again")
        inner: Inner = hparams.group(Inner)

    with pytest.raises(TypeError, match=r"settings \['rate'\] appear in more than one group"):
        hparams.describe(Clash)


def test_training_methods_compose_a_training_group_with_their_own_defaults():
    bip = hparams.build(BipHparams, {"epochs": 5}, "bip")
    assert isinstance(bip.training, TrainConfig) and bip.training.epochs == 5
    assert (bip.training.lr, bip.training.weight_decay) == (0.1, 1e-4)  # BiP's recipe, not TrainConfig's defaults
    assert hparams.build(BipHparams, {"training": {"epochs": 5}}, "bip") == bip
    names = [field.name for field in method_fields(get_method("bip"))]
    assert "epochs" in names and "score_lr" in names and "seed" not in names and "batch_size" not in names
    assert all(get_method(name).trains for name in ("bip", "imp", "dpf", "snip", "chita-gradual"))
    assert not any(get_method(name).trains for name in ("magnitude", "chita", "woodfisher"))


def test_an_owner_may_allow_what_the_group_refuses(tiny_net, tiny_batches):
    prunekit.prune(tiny_net, "snip", 0.5, tiny_batches, epochs=0)  # SNIP: scores only
    with pytest.raises(PrunekitError, match=r"method 'bip' epochs=0 is invalid: set it to an integer >= 1"):
        prunekit.prune(tiny_net, "bip", 0.5, tiny_batches, epochs=0)


@pytest.mark.parametrize("name, where", [("seed", "prune\\(\\)'s `seed`"), ("batch_size", "the loader's")])
def test_names_that_moved_say_where_they_live_now(name, where):
    with pytest.raises(PrunekitError, match=f"^{name} is not a hyperparameter.*{where}"):
        hparams.build(BipHparams, {name: 1}, "bip")


def test_a_budget_reports_its_command_line_flag_and_is_valid_wherever_made():
    with pytest.raises(PrunekitError, match=r"^budget allocation='best' is invalid: .* \(--budget\)$"):
        Budget("best")
    with pytest.raises(PrunekitError, match=r"budget m=1 is invalid: set it to an integer >= 2 \(--m\)"):
        Budget(structure="nm", n=1, m=1)


def test_function_arguments_use_the_same_checker():
    assert hparams.require(3, hparams.integer(1, 5), "n") == 3
    with pytest.raises(PrunekitError, match=r"^n=9 is invalid: set it to an integer in \[1, 5\] for this split$"):
        hparams.require(9, hparams.integer(1, 5), "n", " for this split")
    with pytest.raises(PrunekitError, match="is invalid"):
        hparams.require(True, hparams.integer(0), "n")  # a bool is not a count
