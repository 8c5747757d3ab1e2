"""Real English text: the King James Bible as verses, and tokenised batches for Hugging Face models.

The KJV (`KJV/kjv.tsv.gz` under the data directory; book, chapter, verse, text, tab-separated, 66
books, 31,102 verses) is split by whole books, so that no held-out verse shares a book (its names,
its story, its phrasing) with a verse a method saw: the test set is every 6th book of the canonical
order, Old and New Testament alike — Joshua, 2 Kings, Job, Jeremiah, Amos, Zephaniah, Luke,
Galatians, 1 Timothy, 1 Peter and Revelation (11 books, 5,932 verses); the other 55 books (25,170
verses) are the training set.

`TokenLoader` turns texts into batches with a `tokenizers.Tokenizer` read from a model folder's
tokenizer.json (never downloaded). `tokenizers` comes with the `hf` extra and is imported only here,
when a tokenizer is loaded.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.hparams import integer, require

from ._common import corrupt_file_error, read_maybe_gzipped
from .loader import EpochBatches
from .splits import TensorSplit

KJV_FILE = Path("KJV", "kjv.tsv.gz")
KJV_FIELDS = ("book", "chapter", "verse", "text")
HELD_OUT_EVERY = 6  # books 6, 12, ..., 66 of the canonical order are the test set
TOKENIZER_FILE = "tokenizer.json"
MODEL_CONFIG = "config.json"
DEFAULT_MAX_LENGTH = 128  # tokens, special ones included: what all-MiniLM-L6-v2 was trained with
# Padding is masked out by the attention mask, so its id never reaches a result; 0 is also what
# objectives.concat_batches pads with when it joins batches of different lengths.
PAD_ID = 0


@dataclass(frozen=True)
class TextSplit:
    """Texts, each with the book (or other source) it comes from."""

    texts: tuple[str, ...]
    books: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.books):
            raise PrunekitError(f"{len(self.texts)} texts but {len(self.books)} books; pass one book per text")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> TextSplit:
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
        if index and not 0 <= min(index) <= max(index) < len(self):
            raise PrunekitError(f"subset indices must lie in [0, {len(self)}), got values from {min(index)} to "
                                f"{max(index)}; pass positions within this split")
        return TextSplit(tuple(self.texts[i] for i in index), tuple(self.books[i] for i in index))

    # The same seeded carving as image splits: it needs only len() and subset().
    split = TensorSplit.split
    take = TensorSplit.take


@dataclass
class TextDataset:
    """A text data set: unlabelled texts, for objectives that need inputs only (e.g. loss='distill')."""

    name: str
    train: TextSplit
    test: TextSplit


def read_kjv(data_dir: Path) -> tuple[TextSplit, TextSplit]:
    """The KJV's verses as (train, test), whole books held out (see the module docstring)."""
    path = data_dir / KJV_FILE
    if not path.is_file():
        raise PrunekitError(f"the KJV file {path} is missing: point --data-dir or PRUNEKIT_DATA at the folder "
                            f"that holds {KJV_FILE}")
    verses = _verses(path)
    books = list(dict.fromkeys(book for book, _ in verses))  # canonical order: as the file lists them
    held_out = set(books[HELD_OUT_EVERY - 1::HELD_OUT_EVERY])
    train = [(book, text) for book, text in verses if book not in held_out]
    test = [(book, text) for book, text in verses if book in held_out]
    return _text_split(train), _text_split(test)


def _verses(path: Path) -> list[tuple[str, str]]:
    """(book, text) of every line of the KJV file, in file order."""
    try:
        content = read_maybe_gzipped(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise corrupt_file_error(path, f"it is not UTF-8 text ({exc})") from None
    verses = []
    for number, row in enumerate(csv.reader(io.StringIO(content), delimiter="\t", quoting=csv.QUOTE_NONE), 1):
        if len(row) != len(KJV_FIELDS):
            raise corrupt_file_error(path, f"line {number} has {len(row)} tab-separated fields, not "
                                           f"{len(KJV_FIELDS)} ({', '.join(KJV_FIELDS)})")
        verses.append((row[0], row[3]))
    return verses


def _text_split(pairs: list[tuple[str, str]]) -> TextSplit:
    return TextSplit(tuple(text for _, text in pairs), tuple(book for book, _ in pairs))


# ---------------------------------------------------------------- tokenised batches

class TokenLoader(EpochBatches):
    """Yields mappings {"input_ids", "attention_mask"[, "token_type_ids"]} of int64 B×L tensors, L the
    longest text of the batch (cut at `max_length` tokens), padded on the right with mask 0.

    Each batch is tokenised when it is drawn (a few milliseconds; no start-up cost for a method that
    reads a few batches of a large split). Shuffling is drawn per epoch from a generator seeded by
    (seed, epoch), so the same (seed, epoch) gives identical batches; each iteration uses the current
    epoch and then advances it, and `set_epoch` sets the one the next iteration uses (as `Loader`).
    """

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: Any,
        batch_size: int,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        token_type_ids: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        self.texts = list(texts)
        super().__init__(len(self.texts), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.token_type_ids = token_type_ids
        self.device = torch.device(device)
        self._tokenizer = _configured(tokenizer, max_length)

    @classmethod
    def for_model_folder(cls, texts: Sequence[str], folder: str | Path, batch_size: int, **kwargs) -> TokenLoader:
        """Batches for the model in `folder`: its tokenizer.json, and token type ids where its config has them."""
        kwargs.setdefault("token_type_ids", uses_token_type_ids(folder))
        return cls(texts, load_tokenizer(folder), batch_size, **kwargs)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self._draw()[0].tolist()
        for positions in self._positions():
            yield self._batch([self.texts[i] for i in order[positions]])

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encodings = self._tokenizer.encode_batch(texts)
        fields = {"input_ids": "ids", "attention_mask": "attention_mask"}
        if self.token_type_ids:
            fields["token_type_ids"] = "type_ids"
        return {key: torch.tensor([getattr(encoding, name) for encoding in encodings], dtype=torch.long,
                                  device=self.device) for key, name in fields.items()}


def _configured(tokenizer: Any, max_length: int) -> Any:
    """A copy of `tokenizer` (the caller's stays as it was) that cuts at `max_length` and pads to the longest
    text of each batch: a tokenizer.json may carry its own padding (all-MiniLM-L6-v2's pads every text to 128)."""
    # Below the special tokens' count plus one, tokenizers silently skips truncation.
    special = tokenizer.post_processor.num_special_tokens_to_add(False) if tokenizer.post_processor else 0
    require(max_length, integer(special + 1), "max_length", f" (this tokenizer adds {special} special tokens)")
    copy = type(tokenizer).from_str(tokenizer.to_str())
    copy.enable_truncation(max_length)
    copy.enable_padding(pad_id=PAD_ID)
    return copy


def load_tokenizer(folder: str | Path) -> Any:
    """The `tokenizers.Tokenizer` of a model folder's tokenizer.json."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise PrunekitError(f"{folder} has no {TOKENIZER_FILE}, which text data needs to become tokens; save the "
                            "model's tokenizer into it with tokenizer.save_pretrained(FOLDER)")
    tokenizers = _tokenizers()
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
        raise PrunekitError(f"tokenizers {tokenizers.__version__} cannot read {path}: {' '.join(str(exc).split())}; "
                            "write it again with tokenizer.save_pretrained(FOLDER)") from None


def uses_token_type_ids(folder: str | Path) -> bool:
    """Whether the model's config.json declares token types (BERT-style `type_vocab_size`)."""
    path = Path(folder) / MODEL_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PrunekitError(f"cannot read {path} ({exc}); pass a model folder written by save_pretrained") from None
    return int(config.get("type_vocab_size") or 0) > 0


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise PrunekitError("tokenising text needs the tokenizers package: pip install 'prunekit[hf]'") from None
    return tokenizers
