"""Calibration data: tokenize a text source and cut seeded windows of token ids.

Documents are (optionally) formatted with the tokenizer's chat template, tokenized without special
tokens, joined with the EOS token, and cut into ``num_samples`` windows of ``seq_len`` tokens at
seeded positions (non-overlapping whenever the corpus is long enough). ``check_disjoint`` guards the
evaluation text against overlap with the calibration text.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass

import torch

from hubquant.errors import UsageError
from hubquant.textdata import default_specs, load_texts

NGRAM_WORDS = 13  # a shared 13-word sequence counts as overlap (the GPT-3 contamination rule)


@dataclass(frozen=True, kw_only=True)
class CalibrationSet:
    """Token windows for calibration.

    Attributes:
        ids: LongTensor [num_samples, seq_len].
        spec: the text source spec (e.g. "fortunes").
        description: human-readable source, for the model card.
        texts: the documents the windows were cut from (the leak check and disjointness check use them).
    """

    ids: torch.Tensor
    spec: str
    description: str
    texts: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])


def _format(tokenizer, doc: str, chat_template: bool) -> str:
    if not chat_template:
        return doc
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("--chat-template was given but the tokenizer has no chat template",
                         hint="drop --chat-template for base models")
    # split a document into a question-like head and an answer-like tail: both roles appear in the batch
    cut = doc.find(". ")
    head, tail = (doc[: cut + 1], doc[cut + 2:]) if 0 < cut < len(doc) - 2 else (doc, "")
    msgs = [{"role": "user", "content": head}]
    if tail:
        msgs.append({"role": "assistant", "content": tail})
    return tokenizer.apply_chat_template(msgs, tokenize=False)


def build_calibration(
    tokenizer, *, spec: str | None, num_samples: int = 128, seq_len: int = 2048, seed: int = 0,
    chat_template: bool = False, model_max_len: int | None = None,
) -> CalibrationSet:
    """Tokenize a text source and cut `num_samples` seeded windows of `seq_len` tokens.

    Args:
        tokenizer: a transformers tokenizer.
        spec: text source (see hubquant.textdata); None = the environment's default calibration source.
        num_samples: number of windows.
        seq_len: tokens per window; capped to `model_max_len` and to what the corpus can give (with a warning).
        seed: sampling seed (same seed, same windows).
        chat_template: format each document as a user/assistant exchange with the tokenizer's chat template.
        model_max_len: the model's context length (max_position_embeddings).

    Returns:
        A CalibrationSet.

    Raises:
        UsageError: bad sizes or an empty source. NotFoundError/UnsupportedError from loading the source.
    """
    if num_samples <= 0 or seq_len <= 0:
        raise UsageError(f"--num-samples {num_samples} / --seq-len {seq_len} must be positive",
                         hint="use e.g. --num-samples 128 --seq-len 2048")
    source = load_texts(spec or default_specs()[0])
    if not source.texts:
        raise UsageError(f"calibration source '{source.spec}' has no text", hint="pass another --calib-dataset")
    if model_max_len and seq_len > model_max_len:
        warnings.warn(f"--seq-len {seq_len} capped to the model's context length {model_max_len}", stacklevel=2)
        seq_len = model_max_len

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(source.texts), generator=gen).tolist()
    docs = [source.texts[i] for i in order]
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    encoded = tokenizer([_format(tokenizer, d, chat_template) for d in docs], add_special_tokens=False)["input_ids"]
    flat: list[int] = []
    starts: list[int] = []  # token offset where each document starts
    for toks in encoded:
        starts.append(len(flat))
        flat.extend(toks)
        if not chat_template:  # a chat template already closes each turn
            flat.append(sep)
    total = len(flat)
    if total < seq_len + 1:
        warnings.warn(f"--seq-len {seq_len} capped to {total - 1}: '{source.spec}' has only {total} tokens",
                      stacklevel=2)
        seq_len = max(1, total - 1)
    n_chunks = total // seq_len
    if n_chunks >= num_samples:
        chunk = torch.randperm(n_chunks, generator=gen)[:num_samples].sort().values
        offsets = (chunk * seq_len).tolist()
    else:
        warnings.warn(
            f"'{source.spec}' gives {total} tokens, fewer than {num_samples} x {seq_len}: windows overlap",
            stacklevel=2,
        )
        offsets = torch.randint(0, total - seq_len + 1, (num_samples,), generator=gen).sort().values.tolist()
    data = torch.tensor(flat, dtype=torch.long)
    ids = torch.stack([data[o: o + seq_len] for o in offsets])

    starts_t = torch.tensor(starts)
    used: set[int] = set()
    for o in offsets:  # documents that intersect [o, o + seq_len)
        first = int(torch.searchsorted(starts_t, o, right=True)) - 1
        last = int(torch.searchsorted(starts_t, o + seq_len - 1, right=True)) - 1
        used.update(range(max(first, 0), last + 1))
    texts = tuple(docs[i] for i in sorted(used))
    desc = f"{source.description}: {num_samples} x {seq_len} tokens, seed {seed}"
    if chat_template:
        desc += ", chat template"
    return CalibrationSet(ids=ids, spec=source.spec, description=desc, texts=texts)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngram_hashes(text: str, n: int) -> set[bytes]:
    w = _words(text)
    return {hashlib.blake2b(" ".join(w[i: i + n]).encode(), digest_size=8).digest() for i in range(len(w) - n + 1)}


def check_disjoint(calib: CalibrationSet, eval_texts, *, ngram: int = NGRAM_WORDS) -> None:
    """Raise if the evaluation text overlaps the calibration text.

    Overlap means an identical document (after whitespace/case normalisation) or any shared run of
    `ngram` words.

    Args:
        calib: the calibration set (its `texts` are compared).
        eval_texts: evaluation documents (an iterable of str or a TextSource).

    Raises:
        UsageError: naming how many evaluation documents overlap, with an example.
    """
    texts = list(getattr(eval_texts, "texts", eval_texts))
    norm = lambda t: " ".join(_words(t))
    calib_docs = {norm(t) for t in calib.texts}
    calib_grams: set[bytes] = set()
    for t in calib.texts:
        calib_grams |= _ngram_hashes(t, ngram)
    bad = [t for t in texts if norm(t) in calib_docs or not _ngram_hashes(t, ngram).isdisjoint(calib_grams)]
    if bad:
        example = bad[0][:80].replace("\n", " ")
        raise UsageError(
            f"{len(bad)} of {len(texts)} evaluation documents overlap the calibration text "
            f"(shared documents or {ngram}-word runs), e.g. '{example}...'",
            hint="evaluate on a different source than --calib-dataset (e.g. --eval-dataset lee-news)",
        )
