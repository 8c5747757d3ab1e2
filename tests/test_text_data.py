"""Real English text: the KJV read from its file, split by whole books, and tokenised batches for Hugging Face
models (padded mappings, deterministic per (seed, epoch)); a BERT folder pruned on it through the workflow."""
from __future__ import annotations

import functools
import gzip
import json
import sys
from collections import Counter

import pytest
import torch

from prunekit import prune, workflow
from prunekit.data import TokenLoader, load_dataset, load_tokenizer
from prunekit.errors import PrunekitError
from prunekit.objectives import as_objective

KJV_VERSES = 31_102
HELD_OUT_BOOKS = {"Joshua", "2 Kings", "Job", "Jeremiah", "Amos", "Zephaniah", "Luke", "Galatians", "1 Timothy",
                  "1 Peter", "Revelation"}  # every 6th book of the canonical order
HELD_OUT_VERSES = 5_932
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
PAD, CLS, SEP = 0, 2, 3


@functools.cache
def read_kjv(data_dir):
    return load_dataset("kjv", data_dir)


@pytest.fixture
def kjv(data_dir):
    return read_kjv(data_dir)  # read once for the file: the splits are immutable


def save_word_tokenizer(folder, texts, words: int = 60, fixed_padding: int = 40) -> None:
    """A BERT-style word-level tokenizer ([CLS] text [SEP]) of the texts' most common words, saved with a fixed
    padding of its own (as all-MiniLM-L6-v2's tokenizer.json pads to 128), which the loader must not use."""
    tokenizers = pytest.importorskip("tokenizers")
    common = [word for word, _ in Counter(" ".join(texts).lower().split()).most_common(words)]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {token: index for index, token in enumerate(SPECIALS + common)}, unk_token="[UNK]"))
    tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    tokenizer.enable_padding(length=fixed_padding)
    folder.mkdir(exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.fixture
def verses(kjv):
    return kjv.train.texts[:37]


@pytest.fixture
def bert_folder(tmp_path, verses):
    """A folder holding a tokenizer and a BERT config that declares token types (no weights: loaders only)."""
    folder = tmp_path / "bert"
    save_word_tokenizer(folder, verses)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "type_vocab_size": 2}))
    return folder


# ---------------------------------------------------------------- the data set

def test_every_sixth_book_is_held_out_whole_and_every_verse_is_in_one_split(kjv):
    assert len(kjv.train) + len(kjv.test) == KJV_VERSES
    assert len(kjv.test) == HELD_OUT_VERSES
    assert set(kjv.test.books) == HELD_OUT_BOOKS
    assert len(set(kjv.train.books)) == 55 and not set(kjv.train.books) & HELD_OUT_BOOKS
    assert kjv.train.texts[0] == "In the beginning God created the heaven and the earth."
    assert kjv.test.books[0] == "Joshua" and kjv.test.books[-1] == "Revelation"
    assert all(isinstance(text, str) and text for text in kjv.train.texts + kjv.test.texts)


def test_sizes_keep_a_fixed_subset_of_each_split(data_dir):
    first, again = (load_dataset("kjv", data_dir, train_size=100, test_size=30) for _ in range(2))
    assert (len(first.train), len(first.test)) == (100, 30)
    assert first.train == again.train and first.test == again.test
    assert set(first.test.books) <= HELD_OUT_BOOKS and not set(first.train.books) & HELD_OUT_BOOKS


def test_a_missing_file_is_one_line_naming_the_path_and_the_data_directory(tmp_path):
    with pytest.raises(PrunekitError) as error:
        load_dataset("kjv", tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "KJV" / "kjv.tsv.gz") in message
    assert "PRUNEKIT_DATA" in message and "--data-dir" in message


def test_a_line_without_four_fields_is_named(tmp_path):
    (tmp_path / "KJV").mkdir()
    with gzip.open(tmp_path / "KJV" / "kjv.tsv.gz", "wt") as file:
        file.write("Genesis\t1\t1\tIn the beginning.\nGenesis\t1\tAnd the earth.\n")
    with pytest.raises(PrunekitError, match="line 2 has 3 tab-separated fields, not 4"):
        load_dataset("kjv", tmp_path)


# ---------------------------------------------------------------- tokenised batches

def test_batches_are_int64_mappings_padded_to_their_longest_text_and_cut_at_max_length(bert_folder, verses):
    loader = TokenLoader.for_model_folder(verses, bert_folder, 8, max_length=12)
    tokenizer = load_tokenizer(bert_folder)
    tokenizer.no_padding()
    tokenizer.enable_truncation(12)
    batches = list(loader)
    assert len(loader) == len(batches) == 5  # 37 texts: four batches of 8 and one of 5
    assert [len(batch["input_ids"]) for batch in batches] == [8, 8, 8, 8, 5]
    texts = iter(verses)
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
        shape = batch["input_ids"].shape
        assert all(tensor.dtype == torch.int64 and tensor.shape == shape for tensor in batch.values())
        lengths = batch["attention_mask"].sum(1)
        assert shape[1] == lengths.max() <= 12
        columns = (batch[key] for key in ("input_ids", "attention_mask", "token_type_ids"))
        for ids, mask, types, length in zip(*columns, lengths):
            assert ids[:length].tolist() == tokenizer.encode(next(texts)).ids  # in order, unshuffled
            assert mask.tolist() == [1] * length + [0] * (len(mask) - length)
            assert ids[length:].eq(PAD).all() and types.eq(0).all()
            assert ids[0] == CLS and ids[length - 1] == SEP


def test_token_type_ids_only_where_the_config_declares_them(bert_folder, verses):
    (bert_folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    batch = next(iter(TokenLoader.for_model_folder(verses, bert_folder, 4)))
    assert set(batch) == {"input_ids", "attention_mask"}


def test_shuffling_is_the_same_per_seed_and_epoch_and_differs_across_them(bert_folder, verses):
    def epoch(seed: int, number: int) -> list[torch.Tensor]:
        loader = TokenLoader.for_model_folder(verses, bert_folder, 8, shuffle=True, seed=seed)
        loader.set_epoch(number)
        return [batch["input_ids"] for batch in loader]

    def same(left, right) -> bool:
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(left, right))

    def texts(batches) -> list[tuple[int, ...]]:
        return sorted(tuple(row[row != PAD].tolist()) for batch in batches for row in batch)

    assert same(epoch(0, 0), epoch(0, 0)) and same(epoch(3, 2), epoch(3, 2))
    assert not same(epoch(0, 0), epoch(0, 1)) and not same(epoch(0, 0), epoch(1, 0))
    assert texts(epoch(0, 1)) == texts(epoch(1, 0))  # every text once per epoch, in another order
    loader = TokenLoader.for_model_folder(verses, bert_folder, 8, shuffle=True, seed=0)
    first, second = ([batch["input_ids"] for batch in loader] for _ in range(2))
    assert same(first, epoch(0, 0)) and same(second, epoch(0, 1)) and loader.epoch == 2


def test_a_max_length_the_special_tokens_fill_is_refused(bert_folder, verses):
    with pytest.raises(PrunekitError, match=r"max_length=2 is invalid: .* >= 3 \(this tokenizer adds 2 special"):
        TokenLoader.for_model_folder(verses, bert_folder, 8, max_length=2)


def test_a_missing_tokenizers_package_names_the_extra(bert_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(PrunekitError, match=r"pip install 'prunekit\[hf\]'"):
        load_tokenizer(bert_folder)


# ---------------------------------------------------------------- through the workflow

@pytest.fixture
def tiny_bert_folder(bert_folder):
    transformers = pytest.importorskip("transformers")
    vocab = load_tokenizer(bert_folder).get_vocab_size()
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128,
                                     initializer_range=0.5)  # layers that matter next to the embeddings
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(bert_folder)
    return bert_folder


def test_a_bert_folder_is_pruned_on_kjv_under_distill_and_scored_by_cosine(tiny_bert_folder, data_dir):
    setup = workflow.setup(str(tiny_bert_folder), "kjv", data_dir, test_size=16)
    objective = as_objective("distill", setup.model)  # before pruning: the dense reference
    data = workflow.calibration_loader(setup, 8, seed=0)
    # Per-example gradients of 16 examples from two batches of different lengths, joined for the Fisher.
    result = prune(setup.model, "woodfisher", 0.5, data, loss=objective, fisher_samples=16, steps=1, block_size=64)
    metrics = workflow.evaluate(setup, objective)
    assert result.sparsity == pytest.approx(0.5, abs=1e-4)
    assert metrics["examples"] == 16
    assert 0.0 < metrics["cosine"] < 0.999  # moved away from the dense model, not destroyed


def test_text_needs_a_model_folder_with_a_tokenizer(tiny_bert_folder, data_dir):
    with pytest.raises(PrunekitError, match="kjv is text: pass --model a Hugging Face model folder"):
        workflow.setup("mlpnet", "kjv", data_dir)
    (tiny_bert_folder / "tokenizer.json").unlink()
    with pytest.raises(PrunekitError, match="has no tokenizer.json"):
        workflow.setup(str(tiny_bert_folder), "kjv", data_dir)
