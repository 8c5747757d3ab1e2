"""The bench on a pretrained transformer and text: a tiny BERT folder (random weights) pruned on KJV-like verses
under `loss: distill`, graded by the cosine of the sentence embeddings to the dense model's; the suite's refusals
for a pretrained start and for objectives without a graded metric."""
from __future__ import annotations

import gzip
import json
import random
import textwrap

import pytest
import torch
import torch.nn.functional as F

from prunekit.bench import Store, load_suite, run_suite, write_report
from prunekit.bench.report import accuracy_figure, collect
from prunekit.data import TokenLoader
from prunekit.errors import PrunekitError
from prunekit.masks import load_masks
from prunekit.models.hf import load_model_folder
from prunekit.objectives import pooled

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "and the lord said unto him behold i will bring thee into land of my people for ever".split()
BOOKS = 12  # books 6 and 12 are the held-out ones (every 6th)
VERSES_PER_BOOK = 6
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]

SUITE = """\
name: text
model: ./bert
dataset: kjv
test_size: 8
loss: distill
batch_size: 8
sparsities: [0.5]
seeds: 1
methods:
  - method: magnitude
    exclude: [pooler]
  - method: woodfisher
    hparams: {fisher_samples: 8, fisher_chunk: 8, block_size: 16, steps: 1}
    search: {dampening: [1.0e-4, 1.0e-1]}
    exclude: [pooler]
holdout: 8
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A KJV file of made-up verses in the real layout (book, chapter, verse, text)."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "KJV").mkdir()
    chooser = random.Random(0)
    with gzip.open(folder / "KJV" / "kjv.tsv.gz", "wt") as handle:
        for book in range(1, BOOKS + 1):
            for verse in range(1, VERSES_PER_BOOK + 1):
                words = " ".join(chooser.choice(WORDS) for _ in range(chooser.randint(3, 12)))
                handle.write(f"Book {book}\t1\t{verse}\t{words.capitalize()}.\n")
    return folder


@pytest.fixture(scope="module")
def suite_folder(tmp_path_factory):
    """A tiny BERT (pooler included, which the suite leaves dense) with a word-level tokenizer, saved as a folder."""
    folder = tmp_path_factory.mktemp("suite")
    vocabulary = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    config = transformers.BertConfig(vocab_size=len(vocabulary), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     initializer_range=0.5)  # layers that matter next to the embeddings
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder / "bert")
    tokenizer.save(str(folder / "bert" / "tokenizer.json"))
    return folder


def write(folder, text: str, name: str = "text.yaml"):
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def first_test_batch(bert, data_dir) -> dict[str, torch.Tensor]:
    """The 8 held-out verses the suite draws (`test_size: 8`), tokenised in one batch."""
    from prunekit.data import load_dataset
    texts = load_dataset("kjv", data_dir, test_size=8).test.texts
    return next(iter(TokenLoader.for_model_folder(texts, bert, len(texts))))


def cosine_to_dense(model, dense, batch) -> float:
    """The mean over the verses of the cosine between mean-pooled outputs, computed here without the bench."""
    with torch.no_grad():
        pruned, reference = (pooled(m(**batch).last_hidden_state, batch) for m in (model, dense))
    return F.cosine_similarity(pruned, reference, dim=-1).mean().item()


@pytest.fixture(scope="module")
def db(suite_folder, data_dir):
    path = suite_folder / "runs.db"
    suite = load_suite(str(write(suite_folder, SUITE)), data_dir=data_dir)
    summary = run_suite(suite, path, data_dir=data_dir, progress=False, echo=lambda line: None)
    assert (summary.ran, summary.failures) == (2, [])
    return path


def runs_of(db) -> dict[str, object]:
    with Store(db) as store:
        return {run.label: run for run in store.runs()}


def test_a_bert_folder_is_pruned_on_verses_under_distill_and_graded_by_cosine(db, suite_folder, data_dir):
    runs = runs_of(db)
    magnitude, woodfisher = runs["magnitude"], runs["woodfisher"]
    assert magnitude.config["objective"] == "distill" and magnitude.config["exclude"] == ["pooler"]
    assert set(magnitude.config["start"]["sha256"]) == {"config.json", "model.safetensors"}
    # The stored grade is the cosine of the masked model's sentence embeddings to the dense model's.
    bert = suite_folder / "bert"
    dense, model = load_model_folder(bert), load_model_folder(bert)
    load_masks(model, magnitude.mask_path)
    batch = first_test_batch(bert, data_dir)
    assert magnitude.final.accuracy == pytest.approx(cosine_to_dense(model, dense, batch), abs=1e-5)
    assert 0.0 < magnitude.final.accuracy < 0.999  # moved away from the dense model, not destroyed
    assert 0.0 < woodfisher.final.accuracy < 0.999
    # `exclude:` reached prune: the pooler stayed dense, the 12 encoder matrices carry the whole budget.
    layers = dict(magnitude.final.layers)
    assert layers.pop("pooler.dense.weight") == 0.0 and len(layers) == 12 and max(layers.values()) > 0.5
    # MACs per the first held-out verse's tokens: every encoder matrix once per token, the pooler once.
    tokens = int(batch["attention_mask"][0].sum())
    matrices = sum(p.numel() for n, p in dense.named_parameters() if n.startswith("encoder") and n.endswith("weight")
                   and p.dim() == 2)
    assert magnitude.final.macs_dense == matrices * tokens + dense.pooler.dense.weight.numel()
    # The search scored its candidates by the cosine on the held-out training verses.
    assert woodfisher.search["metric"].startswith("cosine") and len(woodfisher.search["candidates"]) == 2
    assert all(0.0 < candidate["accuracy"] <= 1.0 for candidate in woodfisher.search["candidates"])


def test_the_report_names_the_cosine_everywhere(db, tmp_path):
    text = write_report(db, tmp_path / "report")[0].read_text()
    assert "cosine is the cosine similarity of the pruned model's outputs" in text  # the preface
    assert "start: pretrained weights of bert; objective distill" in text
    assert "Dense model: cosine 100.00 (×100)" in text
    assert "### Cosine to the dense outputs (×100) by sparsity" in text
    assert "held-out cosine to the dense outputs (×100) of each candidate" in text
    assert "top-1" not in text
    with Store(db) as store:
        figure = accuracy_figure(collect(store)[0])
    assert figure.axes[0].get_ylabel() == "cosine to the dense outputs (×100)"
    assert figure.get_suptitle().startswith("text: cosine vs sparsity")


def test_an_isolated_pretrained_run_loads_its_own_weights_and_gives_the_same_cosine(db, suite_folder, data_dir):
    isolated = SUITE.replace("seeds: 1", "seeds: 1\nisolate: true").split("  - method: woodfisher")[0]
    path = suite_folder / "isolated.db"
    suite = load_suite(str(write(suite_folder, isolated, "isolated.yaml")), data_dir=data_dir)
    summary = run_suite(suite, path, data_dir=data_dir, progress=False, echo=lambda line: None)
    assert (summary.ran, summary.failures) == (1, [])
    (run,) = runs_of(path).values()
    assert run.config["isolated"] and run.final.accuracy == runs_of(db)["magnitude"].final.accuracy


def test_an_exclude_that_names_no_tensor_is_refused_before_any_run(suite_folder, data_dir, tmp_path):
    suite = load_suite(str(write(suite_folder, SUITE.replace("exclude: [pooler]", "exclude: [nothing]"), "bad.yaml")),
                       data_dir=data_dir)
    refused = r"bad.yaml, entry 'magnitude': --exclude pattern .*'nothing'.* matches no parameter"
    with pytest.raises(PrunekitError, match=refused):
        run_suite(suite, tmp_path / "runs.db", data_dir=data_dir, progress=False, echo=lambda line: None)
    with Store(tmp_path / "runs.db") as store:
        assert all(run.status == "pending" for run in store.runs())


# ---------------------------------------------------------------- refused before any work

PACKAGED = """\
name: packaged
model: all-minilm-l6-v2
dataset: kjv
loss: distill
sparsities: [0.5]
methods:
  - method: magnitude
"""


def error_of(tmp_path, text: str) -> str:
    with pytest.raises(PrunekitError) as info:
        load_suite(str(write(tmp_path, text)), data_dir=tmp_path)
    return str(info.value)


@pytest.mark.parametrize("start", ["checkpoint: weights.ckpt", "dense: {epochs: 1}", "from_scratch: true",
                                   "model_options: {hidden: [10]}"])
def test_a_pretrained_model_starts_from_its_own_weights(tmp_path, start):
    key = start.split(":")[0]
    message = error_of(tmp_path, PACKAGED.replace("loss: distill\n", f"loss: distill\n{start}\n"))
    assert "text.yaml, line 5: all-minilm-l6-v2 is pretrained and starts from its own weights" in message
    assert f"remove `{key}`" in message
    entry = error_of(tmp_path, PACKAGED + "    from_scratch: true\n")
    assert "line 8: all-minilm-l6-v2 is pretrained: its runs start from its own weights" in entry


def test_only_objectives_with_a_graded_metric_are_allowed(tmp_path):
    message = error_of(tmp_path, PACKAGED.replace("loss: distill", "loss: causal-lm"))
    assert message.endswith("line 4: `loss` must be an objective whose results have a graded metric: cross-entropy "
                            "(graded by accuracy), distill (graded by cosine); got 'causal-lm'")
    on_images = PACKAGED.replace("all-minilm-l6-v2", "lenet300").replace("dataset: kjv", "dataset: synthetic")
    assert load_suite(str(write(tmp_path, on_images.replace("loss: distill\n", "dense: {epochs: 1}\n")))).loss == \
        "cross-entropy"  # the default, as before suites named an objective


def test_text_needs_the_distill_objective(tmp_path):
    missing = error_of(tmp_path, PACKAGED.replace("loss: distill\n", ""))
    assert missing.endswith("line 3: kjv is text without labels, which cross-entropy (the default objective) needs; "
                            "add `loss: distill`")
    labelled = error_of(tmp_path, PACKAGED.replace("loss: distill", "loss: cross-entropy"))
    assert labelled.endswith("line 4: kjv is text without labels, which cross-entropy needs; use `loss: distill`")


def test_models_are_zoo_packaged_or_folders_and_exclude_is_a_valid_regex(tmp_path):
    unknown = error_of(tmp_path, PACKAGED.replace("all-minilm-l6-v2", "minilm"))
    assert "line 2: unknown model 'minilm'; use a zoo model (" in unknown and "all-minilm-l6-v2" in unknown
    (tmp_path / "empty").mkdir()
    folder = error_of(tmp_path, PACKAGED.replace("all-minilm-l6-v2", "./empty"))
    assert f"line 2: {tmp_path / 'empty'} is no Hugging Face model folder (it has no config.json)" in folder
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert load_suite(str(write(tmp_path, PACKAGED.replace("all-minilm-l6-v2", "./empty"))),
                      data_dir=tmp_path).model == str(tmp_path / "empty")
    bad = error_of(tmp_path, PACKAGED + "    exclude: ['pooler(']\n")
    assert "line 8: `exclude` pattern 'pooler(' is not a valid regular expression" in bad
