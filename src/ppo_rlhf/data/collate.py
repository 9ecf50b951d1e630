"""Pad encoded examples into batches of tensors, and draw index batches.

Masks are True on real tokens (never on padding). Training batches are right-padded; prompts for
generation are left-padded so that every row's next token is generated at the same position.
Position ids come from the mask (`position_ids_from_mask`), so padding never shifts them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def _pad(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int | None, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max((len(s) for s in seqs), default=0)
    width = longest if length is None else length
    if width < longest:
        raise ValueError(f"length={length} is shorter than the longest sequence ({longest})")
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        if not seq:
            continue
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, cols] = True
    return ids, mask


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to `length` (default: the longest). Returns ids (B, T) long, mask (B, T) bool."""
    return _pad(seqs, pad_id, length, left=False)


def pad_left(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to `length` (default: the longest). Returns ids (B, T) long, mask (B, T) bool."""
    return _pad(seqs, pad_id, length, left=True)


def collate_sft(batch: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `EncodedSFT` batch: input_ids, attention_mask, loss_mask, each (B, T)."""
    input_ids, attention_mask = pad_right([ex.input_ids for ex in batch], pad_id)
    loss_mask, _ = pad_right([[int(m) for m in ex.loss_mask] for ex in batch], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask.bool()}


def collate_prompts(batch: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation: input_ids, attention_mask, each (B, P)."""
    input_ids, attention_mask = pad_left(batch, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_pairs(batch: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `EncodedPair` batch for one forward pass over both sides.

    input_ids and attention_mask are (2B, T): rows [0, B) are the chosen sequences and rows
    [B, 2B) the rejected ones, in the same order, so `scores[:B] - scores[B:]` pairs them up.
    """
    seqs = [p.chosen_ids for p in batch] + [p.rejected_ids for p in batch]
    input_ids, attention_mask = pad_right(seqs, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class PaddedSet:
    """A training set padded once, so that a batch costs one gather instead of a Python loop over
    its examples. `batch(rows)` equals the collate function's output on those rows: right-padded
    to the longest of them.

    `tensors`: name -> (N, T) tensors (row i = example i), right-padded to the longest example.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.lengths = tensors["attention_mask"].sum(1)  # (N,) real tokens per row

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(rows, dtype=torch.long)
        width = int(self.lengths[idx].max())
        return {k: v[idx, :width] for k, v in self.tensors.items()}


def padded_sft(examples: Sequence, pad_id: int) -> PaddedSet:
    """`EncodedSFT` examples as a `PaddedSet` of input_ids, attention_mask and loss_mask."""
    return PaddedSet(collate_sft(examples, pad_id))


def padded_pairs(pairs: Sequence, pad_id: int) -> PaddedSet:
    """`EncodedPair`s as a `PaddedSet` of 2N rows: row i is pair i's chosen sequence, row N + i its
    rejected one (`pair_rows` picks a batch in `collate_pairs`' order)."""
    return PaddedSet(collate_pairs(pairs, pad_id))


def pair_rows(pairs: Sequence[int], n_pairs: int) -> list[int]:
    """Rows of a `padded_pairs` set for the pairs `pairs`: their chosen rows, then their rejected ones."""
    return list(pairs) + [n_pairs + i for i in pairs]


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) long: 0 at each row's first real token, counting real tokens only.

    Left padding gets position 0 (never attended to); right padding repeats the last position.
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def batches(
    n_items: int, batch_size: int, rng: torch.Generator | None = None, drop_last: bool = False
) -> Iterator[list[int]]:
    """Lists of item indices, `batch_size` at a time; shuffled with `rng` when one is given.

    The last, smaller batch is kept unless `drop_last`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = (
        torch.randperm(n_items, generator=rng) if rng is not None else torch.arange(n_items)
    ).tolist()
    stop = n_items - n_items % batch_size if drop_last else n_items
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
