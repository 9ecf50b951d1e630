"""Train, save and load the byte-level BPE tokenizer of the built-in tasks.

    ppo-rlhf tokenizer --task arithmetic --out runs/tok

Byte-level BPE (the `tokenizers` library) covers every string without an unknown token, and
decoding gives back the exact text, leading spaces included. Digits are always split into single
tokens, so "19" and "91" share their pieces and arithmetic is learnable by a tiny model. The
special tokens pad, eos and bos are distinct; the tokenizer adds none of them by itself (callers
append EOS to responses and pad batches as they need, prompts on the left).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ppo_rlhf.errors import UserError
from ppo_rlhf.fileio import atomic_directory

SPECIAL_TOKENS = {"pad": "<|pad|>", "eos": "<|eos|>", "bos": "<|bos|>"}
"""Special tokens by role; they get ids 0, 1, 2 in a trained tokenizer."""

_HOW_TO_MAKE = "make one with `ppo-rlhf tokenizer --task arithmetic --out DIR`"

_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""`tokenizer_class` values of a plain tokenizer.json (ours): loaded as saved, never as the class
that the model's config.json suggests."""


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    out_dir: str | os.PathLike | None = None,
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; save it to `out_dir` (atomically) when given.

    The vocabulary holds the special tokens, the 256 byte symbols and merges up to `vocab_size`
    (fewer if the texts run out of pairs to merge). Deterministic for the same texts.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(
            f"vocab_size={vocab_size} is below the {256 + len(SPECIAL_TOKENS)} byte and special "
            "tokens of a byte-level BPE; fix: use vocab_size=512 or more"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=SPECIAL_TOKENS["pad"],
        eos_token=SPECIAL_TOKENS["eos"],
        bos_token=SPECIAL_TOKENS["bos"],
        model_max_length=model_max_length,
        # The default clean-up removes spaces before punctuation and breaks the exact round trip.
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> None:
    """`save_pretrained` into `out_dir`, replacing it only once the new directory is complete."""
    with atomic_directory(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory and make sure it has a pad token distinct from EOS.

    A tokenizer without a pad token but with EOS gets "<|pad|>" added (with a warning: its
    vocabulary grows by one, so a model must be sized from `len(tokenizer)`).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer directory {path} does not exist; {_HOW_TO_MAKE}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(
            f"{path} holds no tokenizer (no tokenizer.json or tokenizer_config.json); "
            f"{_HOW_TO_MAKE}"
        )
    try:
        if _is_generic(path):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot load the tokenizer in {path}: {err}; {_HOW_TO_MAKE}") from err
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"tokenizer {path} has no EOS token, so responses cannot end; fix: set eos_token in "
            f"{path / 'tokenizer_config.json'}, or {_HOW_TO_MAKE}"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.add_special_tokens({"pad_token": SPECIAL_TOKENS["pad"]})
        warnings.warn(
            f"tokenizer {path} has no pad token; added {SPECIAL_TOKENS['pad']!r} as id "
            f"{tokenizer.pad_token_id} (vocabulary now {len(tokenizer)}): a pretrained model "
            "needs its embeddings resized to len(tokenizer)",
            stacklevel=2,
        )
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(
            f"tokenizer {path}: pad token {tokenizer.pad_token!r} is also the EOS token, so "
            "masks would hide where responses end; fix: give it a distinct pad token "
            f"(tok.add_special_tokens({{'pad_token': '{SPECIAL_TOKENS['pad']}'}}), "
            f"save_pretrained, resize the model's embeddings), or {_HOW_TO_MAKE}"
        )
    return tokenizer


def _is_generic(path: Path) -> bool:
    """Whether `path` holds a plain tokenizer.json whose config names no model-specific class.

    AutoTokenizer picks the class from the model's config.json when the tokenizer's config names
    the generic one: beside a qwen2 model that is Qwen2Tokenizer, which adds `<|endoftext|>` as
    its unknown token, so the tokenizer would reload one token longer than the model's embedding.
    """
    if not (path / "tokenizer.json").is_file():
        return False
    config_file = path / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {config_file}: {err}; {_HOW_TO_MAKE}") from err
    return config.get("tokenizer_class") in (None, *_GENERIC_CLASSES)


def tokenizer_summary(tokenizer: PreTrainedTokenizerBase) -> dict:
    """Vocabulary size and special tokens, for logs and run reports."""
    summary: dict = {"vocab_size": len(tokenizer), "model_max_length": tokenizer.model_max_length}
    for role in SPECIAL_TOKENS:
        summary[f"{role}_token"] = getattr(tokenizer, f"{role}_token")
        summary[f"{role}_token_id"] = getattr(tokenizer, f"{role}_token_id")
    return summary
