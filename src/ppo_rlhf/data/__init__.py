"""Data: read JSONL files (`jsonl`), tokenise with truncation accounting (`encode`), pad into
tensor batches (`collate`)."""

from ppo_rlhf.data.collate import (
    batches,
    collate_pairs,
    collate_prompts,
    collate_sft,
    pad_left,
    pad_right,
    position_ids_from_mask,
)
from ppo_rlhf.data.encode import (
    EncodedPair,
    EncodedSFT,
    TruncationReport,
    check_token_ids,
    encode_pairs,
    encode_prompts,
    encode_sft,
    encode_texts,
    format_prompt,
)
from ppo_rlhf.data.jsonl import (
    PreferencePair,
    PromptExample,
    ReadReport,
    SFTExample,
    TextExample,
    load_records,
    read_preferences,
    read_prompts,
    read_sft,
    read_texts,
)

__all__ = [
    "EncodedPair",
    "EncodedSFT",
    "PreferencePair",
    "PromptExample",
    "ReadReport",
    "SFTExample",
    "TextExample",
    "TruncationReport",
    "batches",
    "check_token_ids",
    "collate_pairs",
    "collate_prompts",
    "collate_sft",
    "encode_pairs",
    "encode_prompts",
    "encode_sft",
    "encode_texts",
    "format_prompt",
    "load_records",
    "pad_left",
    "pad_right",
    "position_ids_from_mask",
    "read_preferences",
    "read_prompts",
    "read_sft",
    "read_texts",
]
