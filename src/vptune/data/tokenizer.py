"""A word-level tokenizer for the template text of the captioned canvases (``texts.py``), with
the vocabulary shipped beside it (``minivl_vocab.json``): the bundled vision-language and
text-to-image models read text through it.

Text is lower-cased and split into words and single punctuation marks ("t-shirt" stays one
word); ``[CLS] words [SEP]`` is padded with ``[PAD]`` to ``max_length`` (48: the longest
template caption is 47 tokens with both special tokens). Unknown words become ``[UNK]``;
``sks`` is in the vocabulary as the rare identifier of subject-driven generation.

Longer text is truncated with a warning (the policy everywhere in vptune's vision-language
data, as ViLT truncates): ``truncation=True`` truncates silently, ``truncation=False`` refuses.
The call shape is transformers' (``input_ids``, ``attention_mask``), and
``to_transformers()`` gives the same tokenizer as a ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .texts import words

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILE = "minivl_vocab.json"


class WordTokenizer:
    """Word -> id over a fixed vocabulary; ``tokenizer(texts, return_tensors="pt")`` as in transformers."""

    def __init__(self, tokens: list[str], max_length: int) -> None:
        missing = [t for t in SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has repeated tokens")
        self.tokens = list(tokens)
        self.vocab = {token: i for i, token in enumerate(tokens)}
        self.model_max_length = max_length
        self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id = (
            self.vocab[t] for t in SPECIAL_TOKENS)
        self.special_ids = frozenset(self.vocab[t] for t in SPECIAL_TOKENS)

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> "WordTokenizer":
        """The shipped vocabulary, or a JSON file of the same form."""
        text = (Path(path).read_text() if path is not None
                else resources.files("vptune.data").joinpath(VOCAB_FILE).read_text())
        data = json.loads(text)
        return cls(data["tokens"], int(data["max_length"]))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def tokenize(self, text: str) -> list[str]:
        return words(text)

    def encode(self, text: str) -> list[int]:
        """``[CLS] ids [SEP]``, not truncated."""
        ids = [self.vocab.get(word, self.unk_token_id) for word in self.tokenize(text)]
        return [self.cls_token_id, *ids, self.sep_token_id]

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join(self.tokens[i] for i in ids if not (skip_special_tokens and i in self.special_ids))

    def __call__(self, text: str | list[str], padding: bool | str = "max_length", truncation: bool | None = None,
                 max_length: int | None = None, return_tensors: str | None = None, **_: Any) -> dict[str, Any]:
        """``input_ids`` and ``attention_mask`` of one text or a list; padded to ``max_length``
        (``padding="max_length"``, the default) or to the longest text (``"longest"``/``True``)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        limit = max_length or self.model_max_length
        encoded = [self.encode(t) for t in texts]
        long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        if long and truncation is False:
            raise ValueError(f"{len(long)} text(s) longer than {limit} tokens, first {texts[long[0]]!r} "
                             f"({len(encoded[long[0]])} tokens); shorten it or allow truncation")
        if long and truncation is None:
            warnings.warn(f"{len(long)} text(s) longer than {limit} tokens were truncated, first "
                          f"{texts[long[0]]!r} ({len(encoded[long[0]])} tokens)", stacklevel=2)
        encoded = [ids if len(ids) <= limit else ids[:limit - 1] + [self.sep_token_id] for ids in encoded]
        width = limit if padding == "max_length" else max(map(len, encoded)) if padding else None
        masks = [[1] * len(ids) for ids in encoded]
        if width is not None:
            masks = [m + [0] * (width - len(m)) for m in masks]
            encoded = [ids + [self.pad_token_id] * (width - len(ids)) for ids in encoded]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(encoded, dtype=torch.long),
                    "attention_mask": torch.tensor(masks, dtype=torch.long)}
        if single:
            return {"input_ids": encoded[0], "attention_mask": masks[0]}
        return {"input_ids": encoded, "attention_mask": masks}

    def to_transformers(self):
        """The same tokenizer as a transformers ``PreTrainedTokenizerFast`` (built from a
        tokenizers WordLevel model), for code that expects one (ViLT's processor, say)."""
        from ..extras import require

        require("vl", purpose="a transformers tokenizer")
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordLevel
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(WordLevel(self.vocab, unk_token="[UNK]"))
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Sequence(  # the rule of texts.words
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\-]"), behavior="isolated")])
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", self.cls_token_id), ("[SEP]", self.sep_token_id)])
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, model_max_length=self.model_max_length, pad_token="[PAD]", unk_token="[UNK]",
            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def mask_tokens(input_ids: torch.Tensor, tokenizer: WordTokenizer, probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking for masked language modelling (ViLT's MLM objective): each non-special
    token is chosen with ``probability``; a chosen token becomes [MASK] (80%), a random word
    (10%) or stays (10%). Returns (masked ids, labels with -100 where not chosen)."""
    special = torch.tensor(sorted(tokenizer.special_ids))
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~torch.isin(input_ids, special)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    draw = torch.rand(input_ids.shape, generator=generator)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in tokenizer.special_ids])
    random_words = ordinary[torch.randint(len(ordinary), input_ids.shape, generator=generator)]
    masked = torch.where(chosen & (draw < 0.8), torch.full_like(input_ids, tokenizer.mask_token_id), input_ids)
    masked = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_words, masked)
    return masked, labels
