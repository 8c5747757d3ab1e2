"""Suite files: what they may say, and errors that name the file, the line and the fix."""
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from prunekit.bench.suite import find_suite, list_suites, load_suite
from prunekit.errors import PrunekitError
from prunekit.methods import _REGISTRY, Method, all_methods

GOOD = """\
name: tiny
description: two methods on synthetic data
model: lenet300
dataset: synthetic
dense:
  epochs: 2
  lr: 0.05
sparsities: [0.5, 0.9]
seeds: 2
methods:
  - method: magnitude
  - method: random
    label: random-control
    sparsities: [0.9]
published:
  - {method: magnitude, sparsity: 0.9, accuracy: 0.8, std: 0.01, source: "Made-up et al. 2030, Table 9"}
quick:
  dense: {epochs: 1}
  sparsities: [0.9]
"""


@dataclass(frozen=True)
class KnobHparams:
    knob: float = field(default=1.0, metadata={"help": "a number in (0, 10)"})
    flip: bool = field(default=False, metadata={"help": "a second knob"})

    def check_relations(self) -> None:
        if not 0 < self.knob < 10:
            raise PrunekitError(f"knob must be in (0, 10), got {self.knob}")


@pytest.fixture
def knob_method(monkeypatch):
    """A method with hyperparameters, registered for one test only."""
    def run(ctx, hp):
        return ctx.select({t.name: t.weight.detach().abs() for t in ctx.targets})

    monkeypatch.setitem(_REGISTRY, "knob-test", Method("knob-test", run, KnobHparams, "test method"))


def write(tmp_path, text: str, name: str = "suite.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path, **kwargs) -> str:
    with pytest.raises(PrunekitError) as info:
        load_suite(str(path), **kwargs)
    return str(info.value)


def test_a_good_suite_loads_with_defaults_filled_in(tmp_path):
    suite = load_suite(str(write(tmp_path, GOOD)))
    assert (suite.name, suite.model, suite.dataset, suite.seeds, suite.batch_size) == (
        "tiny", "lenet300", "synthetic", (0, 1), 128)
    assert suite.dense.epochs == 2 and suite.dense.lr == 0.05 and suite.dense.momentum == 0.9
    assert [(m.label, m.method, m.sparsities) for m in suite.methods] == [
        ("magnitude", "magnitude", (0.5, 0.9)), ("random-control", "random", (0.9,))]
    assert suite.published[0].source.startswith("Made-up") and suite.published[0].accuracy == 0.8
    assert suite.checkpoint is None and not suite.from_scratch


def test_quick_merges_mappings_and_keeps_one_seed(tmp_path):
    path = write(tmp_path, GOOD)
    quick = load_suite(str(path), quick=True)
    assert quick.dense.epochs == 1 and quick.dense.lr == 0.05  # merged into the recipe, not replacing it
    assert quick.sparsities == (0.9,) and quick.seeds == (0,)
    assert load_suite(str(path), seeds=3).seeds == (0, 1, 2)


VARIANTS = """\
variants:
  long:
    description: longer
    dense: {epochs: 5}
    sparsities: [0.7]
    quick: {sparsities: [0.7]}
  one-method:
    methods:
      - method: random
"""


def test_variants_merge_like_quick_and_name_their_runs(tmp_path):
    path = write(tmp_path, GOOD + VARIANTS)
    base, long = load_suite(str(path)), load_suite(str(path), variant="long")
    assert (base.variant, base.variants, base.stored_name) == (None, ("long", "one-method"), "tiny")
    assert (long.variant, long.stored_name, long.description) == ("long", "tiny:long", "longer")
    assert long.dense.epochs == 5 and long.dense.lr == 0.05  # mappings merge, other values replace
    assert [(m.label, m.sparsities) for m in long.methods] == [("magnitude", (0.7,)), ("random-control", (0.9,))]
    quick = load_suite(str(path), variant="long", quick=True)  # the suite's quick, then the variant's over it
    assert (quick.dense.epochs, quick.methods[0].sparsities, quick.seeds) == (1, (0.7,), (0,))
    assert [m.label for m in load_suite(str(path), variant="one-method").methods] == ["random"]
    assert long.argument == f"{path} --variant long"


def test_an_unknown_variant_is_one_line_naming_the_suites_variants(tmp_path):
    message = error_of(write(tmp_path, GOOD + VARIANTS), variant="short")
    assert message.endswith("has no variant 'short'; its variants: long, one-method") and "\n" not in message
    assert error_of(write(tmp_path, GOOD), variant="short").endswith("it declares none (`variants:`)")


def test_every_variant_is_checked_whichever_is_loaded(tmp_path):
    broken = VARIANTS.replace("    dense: {epochs: 5}\n", "    dense: {epochs: five}\n")
    assert ", line 23: dense training epochs must be an integer" in error_of(write(tmp_path, GOOD + broken))


SEARCH = """\
holdout: 100
methods:
  - method: knob-test
    hparams: {knob: 2.0}
    search: {knob: [1.0, 3.0], flip: [false, true]}
"""


def test_a_search_is_the_grid_of_its_values_over_the_entrys_hyperparameters(tmp_path, knob_method):
    text = GOOD.split("methods:\n")[0] + SEARCH
    entry = load_suite(str(write(tmp_path, text))).methods[0]
    assert entry.hparams == {"knob": 2.0, "flip": False} and entry.search == {"knob": (1.0, 3.0), "flip": (False, True)}
    assert entry.candidates == [{"knob": 1.0, "flip": False}, {"knob": 1.0, "flip": True},
                                {"knob": 3.0, "flip": False}, {"knob": 3.0, "flip": True}]
    assert load_suite(str(write(tmp_path, GOOD))).methods[0].candidates == [{}]  # no search: one run as it is
    message = error_of(write(tmp_path, text.replace("holdout: 100\n", "")))
    assert ", line 1: entry 'knob-test' has `search:` but the suite holds out no training data" in message
    assert "add `holdout: N`" in message
    invalid = error_of(write(tmp_path, text.replace("[1.0, 3.0]", "[1.0, 30.0]")))
    assert ", line 14: the candidate {'knob': 30.0, 'flip': False} is invalid: knob must be in (0, 10)" in invalid


@pytest.mark.parametrize("change, line, words", [
    (("sparsities: [0.5, 0.9]", "sparsity: [0.5, 0.9]"), 8, "a suite has no key 'sparsity'"),
    (("  - method: magnitude", "  - method: magnitud"), 11, "unknown method 'magnitud'"),
    (("sparsities: [0.5, 0.9]", "sparsities:\n  - 0.5\n  - 1.2"), 10, "[0, 1)"),
    (("model: lenet300", "model: lenet301"), 3, "unknown model 'lenet301'"),
    (("  lr: 0.05", "  lr: fast"), 7, "must be a number"),
    (("  lr: 0.05", "  learning_rate: 0.05"), 7, "no hyperparameter 'learning_rate'"),
    (("seeds: 2", "seeds: -1"), 9, "number of seeds"),
    (("    label: random-control", "    label: magnitude"), 13, "labelled 'magnitude'"),
    (("accuracy: 0.8,", "accuracy: 80,"), 16, "write 93.97% as 0.9397"),
    (("quick:\n", "quick:\n  name: other\n"), 18, "`quick` cannot change 'name'"),
    (("seeds: 2", "seeds: 2\nseeds: 3"), 10, "appears twice"),
    (("    label: random-control", "    label: [random"), 14, "not valid YAML"),
    (("dense:\n  epochs: 2\n  lr: 0.05\n", ""), 1, "names no dense model"),
    (("model: lenet300", "model: lenet300\nmodel_options: {shortcut: identity}"), 4,
     "model 'lenet300' takes no option shortcut; its options are: hidden"),
    (("model: lenet300", "model: lenet300\nmodel_options: {num_classes: 3}"), 4, "follows from the dataset"),
    (("seeds: 2", "seeds: 2\ndevice: gpu"), 10, "unknown device 'gpu'; use one of cpu, cuda"),
    (("seeds: 2", "seeds: 2\naugment: true"), 10, "synthetic has no training augmentation"),
    (("seeds: 2", "seeds: 2\naugment: often"), 10, "`augment` must be true or false, got 'often'"),
    (("seeds: 2", "seeds: 2\ntraining: {seed: 3}"), 10, "runs are seeded by prune()'s `seed`"),
    (("  lr: 0.05", "  batch_size: 64"), 7, "`batch_size:` in a suite"),
    (("seeds: 2", "seeds: 2\ntrain_size: 0"), 10, "`train_size` must be None or an integer >= 1, got 0"),
    (("seeds: 2", "seeds: 2\nholdout: 1.5"), 10, "`holdout` must be None or an integer >= 1"),
    (("seeds: 2", "seeds: 2\nisolate: yes please"), 10, "`isolate` must be true or false"),
    (("seeds: 2", "seeds: 2\ntraining:\n  epochs: 3\n  lr: fast"), 12, "training lr must be a number"),
    (("    label: random-control", "    from_scratch: maybe"), 13, "`from_scratch` must be true or false"),
    (("quick:\n", "quick:\n  device: cpu\n"), 18, "`quick` cannot change 'device'"),
    (("quick:\n", "quick:\n  variants: {}\n"), 18, "`quick` cannot change 'variants'"),
    (("quick:\n", "variants:\n  long:\n    name: other\nquick:\n"), 19, "a variant cannot change 'name'"),
    (("quick:\n", "variants:\n  long run:\n    seeds: 1\nquick:\n"), 18, "variant name 'long run' must be"),
    (("quick:\n", "variants:\n  long:\n    seeds: 0\nquick:\n"), 19, "`seeds` must be a number of seeds"),
    (("    label: random-control", "    search: {seed: [1, 2]}"), 13, "has no hyperparameter 'seed' to search"),
    (("    label: random-control", "    search: {knob: 2}"), 13, "method 'random' has no hyperparameter 'knob'"),
    (("    label: random-control", "    search: {}\n    measure_recorded: true"), 13, "cannot also have"),
])
def test_errors_name_the_line_and_the_fix(tmp_path, change, line, words):
    path = write(tmp_path, GOOD.replace(*change))
    message = error_of(path)
    assert message.startswith(f"suite {path}, line {line}: "), message
    assert words in message


def test_method_hyperparameters_are_checked_one_by_one(tmp_path, knob_method):
    def suite_with(hparams: str):
        entry = f"  - method: knob-test\n    hparams:\n{hparams}"
        return write(tmp_path, GOOD.replace("  - method: magnitude\n", entry))

    assert load_suite(str(suite_with("      knob: 3\n"))).methods[0].hparams == {"knob": 3.0, "flip": False}
    message = error_of(suite_with("      knob: 3\n      nob: 2\n"))
    assert ", line 14: method 'knob-test' has no hyperparameter 'nob'; its hyperparameters are: knob, flip" in message
    assert ", line 13: method 'knob-test' knob must be a number" in error_of(suite_with("      knob: high\n"))
    assert "knob must be in (0, 10), got 30" in error_of(suite_with("      knob: 30\n"))  # the method's validate()
    assert ", line 13: `seed` is an argument of prune() that the bench sets" in error_of(suite_with("      seed: 4\n"))


def test_budgets_are_validated_with_their_sparsities(tmp_path):
    bad = GOOD.replace("  - method: magnitude\n", "  - method: magnitude\n    budget: {structure: nm, n: 2, m: 4}\n")
    assert "2:4 sparsity is always 0.5; give this entry `sparsities: [0.5]`" in error_of(write(tmp_path, bad))
    fixed = bad.replace("m: 4}\n", "m: 4}\n    sparsities: [0.5]\n")
    assert load_suite(str(write(tmp_path, fixed))).methods[0].budget.structure == "nm"
    unknown = GOOD.replace("  - method: magnitude\n", "  - method: magnitude\n    budget: {allocation: best}\n")
    assert "allocation='best' is invalid: set it to one of global, uniform, erk" in error_of(write(tmp_path, unknown))


def test_optional_entries_of_missing_methods_are_skipped_with_a_note(tmp_path):
    text = GOOD.replace("  - method: magnitude\n", "  - method: magnitude\n  - method: not-yet\n    optional: true\n"
                                                   "    hparams: {epochs: 1}\n")
    suite = load_suite(str(write(tmp_path, text)))
    assert [m.label for m in suite.methods] == ["magnitude", "random-control"]
    assert "not-yet is not registered" in suite.notes[0] and "line 12" in suite.notes[0]
    only_missing = text.replace("  - method: magnitude\n", "").replace("  - method: random\n    label: random-control\n"
                                                                        "    sparsities: [0.9]\n", "")
    assert "no method of this suite is registered (not-yet is not registered" in error_of(write(tmp_path, only_missing))


def test_all_means_every_registered_method_and_explicit_entries_replace_theirs(tmp_path, knob_method):
    text = GOOD.replace("  - method: magnitude\n", "  - method: all\n  - method: knob-test\n    hparams: {knob: 2}\n")
    text = text.replace("    label: random-control\n", "")
    suite = load_suite(str(write(tmp_path, text)))
    labels = [m.label for m in suite.methods]
    assert labels == [m.name for m in all_methods()]  # each once, in the registry's order
    assert next(m for m in suite.methods if m.label == "knob-test").hparams["knob"] == 2.0
    assert next(m for m in suite.methods if m.label == "random").sparsities == (0.9,)
    with_hparams = GOOD.replace("  - method: magnitude\n", "  - method: all\n    hparams: {epochs: 2}\n")
    assert "`method: all` takes no hparams" in error_of(write(tmp_path, with_hparams))


def test_checkpoint_paths_expand_variables_and_start_at_the_suite_folder(tmp_path, monkeypatch):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "dense.safetensors").write_bytes(b"x")
    start = "dense:\n  epochs: 2\n  lr: 0.05\n"
    suite_text = GOOD.replace("  dense: {epochs: 1}\n", "")
    relative = write(tmp_path, suite_text.replace(start, "checkpoint: weights/dense.safetensors\n"))
    assert load_suite(str(relative)).checkpoint == tmp_path / "weights" / "dense.safetensors"
    monkeypatch.setenv("WEIGHTS_HOME", str(tmp_path / "weights"))
    variable = write(tmp_path, suite_text.replace(start, "checkpoint: ${WEIGHTS_HOME}/dense.safetensors\n"))
    assert load_suite(str(variable)).checkpoint == tmp_path / "weights" / "dense.safetensors"
    monkeypatch.delenv("WEIGHTS_HOME")
    assert ", line 5: `checkpoint` uses ${WEIGHTS_HOME}, which is not set" in error_of(variable)
    missing = write(tmp_path, suite_text.replace(start, "checkpoint: weights/nope.ckpt\n"))
    message = error_of(missing)
    assert ", line 5: checkpoint " in message and "nope.ckpt does not exist; fix the path" in message


def test_a_relative_data_folder_starts_where_the_command_runs(tmp_path, monkeypatch):
    (tmp_path / "data" / "weights").mkdir(parents=True)
    (tmp_path / "data" / "weights" / "dense.safetensors").write_bytes(b"x")
    (tmp_path / "suites").mkdir()
    suite_text = GOOD.replace("  dense: {epochs: 1}\n", "").replace(
        "dense:\n  epochs: 2\n  lr: 0.05\n", "checkpoint: ${PRUNEKIT_DATA}/weights/dense.safetensors\n")
    path = write(tmp_path / "suites", suite_text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNEKIT_DATA", "data")
    assert load_suite(str(path)).checkpoint == tmp_path / "data" / "weights" / "dense.safetensors"
    monkeypatch.delenv("PRUNEKIT_DATA")
    assert load_suite(str(path), data_dir=Path("data")).checkpoint == tmp_path / "data" / "weights" / "dense.safetensors"


def test_data_sets_with_files_need_a_data_folder_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    path = write(tmp_path, GOOD.replace("dataset: synthetic", "dataset: mnist"))
    assert ", line 4: no data directory: pass --data-dir" in error_of(path)
    assert ", line 4: data folder " in error_of(path, data_dir=tmp_path / "nowhere")


def test_unknown_suites_and_the_shipped_ones(tmp_path):
    with pytest.raises(PrunekitError, match="no suite named 'nope'; shipped suites: .*demo"):
        load_suite("nope")
    with pytest.raises(PrunekitError, match="does not exist"):
        load_suite(str(tmp_path / "missing.yaml"))
    assert "demo" in [name for name, _, _ in list_suites()]
    for quick in (False, True):
        assert load_suite("demo", quick=quick).methods  # offline, valid everywhere


def test_every_shipped_suite_and_each_of_its_variants_is_valid_where_the_data_is(data_dir):
    for name, _, variants in list_suites():
        for variant in (None, *variants):
            for quick in (False, True):
                suite = load_suite(name, variant=variant, quick=quick)
                assert suite.methods and suite.variant == variant and suite.variants == variants


REPRODUCTIONS = ("bip_lenet300", "bip_resnet20", "bip_filters", "dpf_lenet300", "dpf_lenet5", "dpf_resnet20",
                 "chita_mlpnet", "chita_resnet20", "minilm_kjv")


def test_every_reproduction_suite_says_how_to_run_it_and_has_a_smoke_run():
    descriptions = {name: description for name, description, _ in list_suites()}
    variants = {name: names for name, _, names in list_suites()}
    for name in REPRODUCTIONS:
        text, description = find_suite(name).read_text(), descriptions[name]
        assert text.startswith("#") and f"prunekit bench --suite {name}" in text, name  # the header comment
        assert "\nquick:" in text and description, name
        for variant in variants[name]:  # each variant's command is in the header too
            assert f"prunekit bench --suite {name} --variant {variant}" in text, (name, variant)


TRAINING = """\
training:
  epochs: 3
  lr: 0.02
"""


def test_training_is_every_training_methods_recipe_and_entries_override_it(tmp_path):
    text = GOOD.replace("methods:\n", TRAINING + "methods:\n").replace(
        "  - method: random\n", "  - method: omp\n  - method: imp\n    label: imp-5\n    hparams: {epochs: 5}\n"
                               "  - method: random\n")
    path = write(tmp_path, text.replace("  dense: {epochs: 1}\n", "  dense: {epochs: 1}\n  training: {epochs: 2}\n"))
    entries = {entry.label: entry.hparams for entry in load_suite(str(path)).methods}
    assert entries["magnitude"] == {} and "epochs" not in entries["random-control"]  # not training methods
    assert (entries["omp"]["epochs"], entries["omp"]["lr"], entries["omp"]["weight_decay"]) == (3, 0.02, 5e-4)
    assert (entries["imp-5"]["epochs"], entries["imp-5"]["lr"]) == (5, 0.02)
    quick = {entry.label: entry.hparams for entry in load_suite(str(path), quick=True).methods}
    assert (quick["omp"]["epochs"], quick["omp"]["lr"], quick["imp-5"]["epochs"]) == (2, 0.02, 5)
    everything = write(tmp_path, GOOD.replace("methods:\n", "training: {lr: 0.02}\nmethods:\n").replace(
        "  - method: magnitude\n", "  - method: all\n").replace("    label: random-control\n", ""))
    learning_rates = {entry.label: entry.hparams.get("lr") for entry in load_suite(str(everything)).methods}
    assert (learning_rates["dpf"], learning_rates["bip"], learning_rates["magnitude"]) == (0.02, 0.02, None)


def test_a_method_check_failing_on_the_training_recipe_names_the_entry(tmp_path):
    imp = "  - method: imp\n    hparams: {train_dense: true, rewind_epoch: 1}\n"
    text = GOOD.replace("methods:\n", "training: {epochs: 1}\nmethods:\n").replace(
        "  - method: random\n", imp + "  - method: random\n")
    message = error_of(write(tmp_path, text))
    assert ", line 14: rewind_epoch=1.0 must be in [0, epochs=1)" in message  # the line of imp's hparams


def test_from_scratch_runs_may_have_a_dense_reference_and_entries_may_start_from_scratch(tmp_path):
    reference = load_suite(str(write(tmp_path, GOOD.replace("dense:\n", "from_scratch: true\ndense:\n"))))
    assert reference.from_scratch and reference.dense.epochs == 2
    entry = GOOD.replace("    label: random-control\n", "    label: random-control\n    from_scratch: true\n")
    assert [m.from_scratch for m in load_suite(str(write(tmp_path, entry))).methods] == [False, True]
    both = GOOD.replace("dense:\n  epochs: 2\n  lr: 0.05\n", "checkpoint: w.ckpt\nfrom_scratch: true\n")
    message = error_of(write(tmp_path, both.replace("  dense: {epochs: 1}\n", "  seeds: 1\n")))
    assert ", line 6: the suite has both `checkpoint` and `from_scratch`" in message
    with_all = GOOD.replace("  - method: magnitude\n", "  - method: all\n    from_scratch: true\n")
    assert "`method: all` takes no from_scratch" in error_of(write(tmp_path, with_all))


def test_device_model_options_and_augment_are_read(tmp_path):
    text = GOOD.replace("seeds: 2", "seeds: 2\ndevice: cuda").replace(
        "model: lenet300", "model: lenet300\nmodel_options: {hidden: [20, 10]}")
    path = write(tmp_path, text)
    suite = load_suite(str(path))
    assert (suite.device, dict(suite.model_options), suite.augment, suite.quick) == ("cuda", {"hidden": [20, 10]},
                                                                                      False, False)
    assert load_suite(str(path), quick=True).quick and suite.argument == str(path)
    assert load_suite("demo").argument == "demo" and load_suite("demo").device == "cpu"
