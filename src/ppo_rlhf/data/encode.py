"""Tokenise examples into id lists, truncating by fixed rules and counting what was cut.

Sequences are `[bos] + prompt + response + [eos]`. Prompt and response are tokenised separately
and concatenated, so the prompt/response boundary is always a token boundary -- the same one the
policy sees in PPO, where it generates after the encoded prompt.

Truncation rules (counted in a `TruncationReport`):
- the prompt keeps its LAST `max_prompt_len` tokens (the end of a prompt, next to the answer,
  matters most); a leading bos token is kept in front;
- then the whole sequence is cut on the right to `max_len`, which may drop the eos token;
- an example with no response token left is dropped (only possible when
  `max_prompt_len >= max_len`, a loose "cap everything at max_len" setting).

    encoded, report = encode_sft(tokenizer, examples, max_prompt_len=64, max_len=128)
    print(report.describe())
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ppo_rlhf.errors import UserError


@dataclass(frozen=True)
class EncodedSFT:
    """An SFT sequence: `loss_mask[i]` is True on the response tokens and the eos token."""

    input_ids: list[int]
    loss_mask: list[bool]
    prompt_len: int
    source: str


@dataclass(frozen=True)
class EncodedPair:
    """Chosen and rejected full sequences sharing the first `prompt_len` tokens (the prompt)."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_len: int
    source: str
    group: int | None = None


@dataclass
class TruncationReport:
    """How many examples were cut or dropped while encoding; `describe()` says it in words.

    `responses_truncated` counts responses (two per preference pair) that lost tokens; the eos
    is the last token, so each of them lost it. `dropped_identical` counts pairs whose chosen
    and rejected sequences became equal after truncation.
    """

    kind: str
    max_prompt_len: int
    max_len: int | None = None
    total: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    texts_truncated: int = 0
    dropped_no_response: int = 0
    dropped_identical: int = 0
    dropped_sources: list[str] = field(default_factory=list)
    knobs: str = ""  # the settings that would keep more; default "max_prompt_len / max_len"

    @property
    def dropped(self) -> int:
        """Examples not returned."""
        return self.dropped_no_response + self.dropped_identical

    @property
    def kept(self) -> int:
        """Examples returned."""
        return self.total - self.dropped

    def describe(self) -> str:
        """One sentence for the run log, naming the knob that would keep more."""
        parts = [f"encoded {self.kept} of {self.total} {self.kind}"]
        if self.prompts_truncated:
            parts.append(
                f"{self.prompts_truncated} prompts cut from the left to "
                f"{self.max_prompt_len} tokens"
            )
        if self.responses_truncated:
            parts.append(
                f"{self.responses_truncated} responses cut at {self.max_len} tokens "
                "(losing their eos)"
            )
        if self.texts_truncated:
            parts.append(f"{self.texts_truncated} cut at {self.max_len} tokens (losing their eos)")
        if self.dropped_no_response:
            parts.append(f"{self.dropped_no_response} dropped with no response token left")
        if self.dropped_identical:
            parts.append(
                f"{self.dropped_identical} pairs dropped because chosen and rejected "
                "were identical after truncation"
            )
        sentence = "; ".join(parts)
        if self.prompts_truncated or self.responses_truncated or self.texts_truncated or self.dropped:
            knobs = self.knobs or (
                "max_prompt_len / max_len" if self.max_len is not None else "max_prompt_len"
            )
            sentence += f" (raise {knobs} to keep more)"
        return sentence


def format_prompt(tokenizer: Any, prompt: str | list[dict]) -> str:
    """The prompt text the model sees, ending where the response begins.

    With a chat template: the template applied with `add_generation_prompt=True` (a string
    prompt becomes one user message). Without one: a string is used as it is, and a messages
    list becomes its contents joined by newlines -- so `[{"role": "user", "content": p}]` and
    `p` give the same text, and a model trained on plain prompts reads either form alike.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    return "\n".join(message["content"] for message in prompt)


def _format_all(tokenizer: Any, prompts: list, sources: list[str]) -> list[str]:
    """`format_prompt` of each prompt; a chat template refusing one is the data's fault."""
    from jinja2 import TemplateError

    texts = []
    for prompt, source in zip(prompts, sources):
        try:
            texts.append(format_prompt(tokenizer, prompt))
        except TemplateError as err:
            raise UserError(
                f"{source}: the tokenizer's chat template rejects this prompt: {err}; "
                "fix the messages (e.g. roles in the order the template expects)"
            ) from None
    return texts


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (one batched call: fast tokenizers)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _bos(tokenizer: Any, add_bos: bool) -> int | None:
    return tokenizer.bos_token_id if add_bos else None


def _prompt_ids(
    ids: list[int], bos: int | None, max_prompt_len: int, source: str, report: TruncationReport
) -> list[int]:
    """bos + prompt ids, left-truncated to `max_prompt_len` with the bos kept in front."""
    if bos is not None and not (ids and ids[0] == bos):  # a chat template may write it already
        ids = [bos] + ids
    if not ids:
        raise UserError(
            f"{source}: the prompt encodes to no tokens with this tokenizer (its "
            "characters are not in the vocabulary and it has no unknown or bos "
            "token); use a tokenizer trained on text like this data"
        )
    if len(ids) > max_prompt_len:
        report.prompts_truncated += 1
        head = ids[:1] if bos is not None else []
        ids = head + ids[len(ids) - (max_prompt_len - len(head)) :]
    return ids


def _check_lengths(max_prompt_len: int, max_len: int | None, bos: int | None) -> None:
    """Reject lengths that leave no room for a prompt token (after bos) or a response token."""
    least = 2 if bos is not None else 1
    if max_prompt_len < least:
        raise UserError(
            f"max_prompt_len is {max_prompt_len}; it must be at least {least} to "
            "hold a prompt token" + (" after the bos token" if least == 2 else "")
        )
    if max_len is not None and max_len < least + 1:
        raise UserError(
            f"max_len is {max_len}; it must be at least {least + 1} to hold a "
            "prompt token and a response token"
        )


def _eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError(
            "the tokenizer has no eos token, so responses cannot end; use a "
            "tokenizer saved by `ppo-rlhf tokenizer` or set its eos_token"
        )
    return tokenizer.eos_token_id


def _sequence(
    prompt: list[int], response: list[int], eos: int, max_len: int, report: TruncationReport
) -> list[int] | None:
    """prompt + response + eos cut to `max_len`, or None if no response token is left."""
    full = prompt + response + [eos]
    if len(full) <= max_len:
        return full
    report.responses_truncated += 1
    if len(prompt) >= max_len:
        return None
    return full[:max_len]


def _note_drop(report: TruncationReport, source: str) -> None:
    if len(report.dropped_sources) < 5:
        report.dropped_sources.append(source)


def encode_sft(
    tokenizer: Any, examples: Sequence, max_prompt_len: int, max_len: int, add_bos: bool = True
) -> tuple[list[EncodedSFT], TruncationReport]:
    """Encode `SFTExample`s as `[bos] prompt response eos` with the loss on response + eos."""
    bos, eos = _bos(tokenizer, add_bos), _eos(tokenizer)
    _check_lengths(max_prompt_len, max_len, bos)
    report = TruncationReport("SFT examples", max_prompt_len, max_len, total=len(examples))
    prompts = _tokenize(
        tokenizer,
        _format_all(tokenizer, [ex.prompt for ex in examples], [ex.source for ex in examples]),
    )
    responses = _tokenize(tokenizer, [ex.response for ex in examples])
    out = []
    for ex, prompt_ids, response_ids in zip(examples, prompts, responses):
        prompt_ids = _prompt_ids(prompt_ids, bos, max_prompt_len, ex.source, report)
        ids = _sequence(prompt_ids, response_ids, eos, max_len, report)
        if ids is None:
            report.dropped_no_response += 1
            _note_drop(report, ex.source)
            continue
        n_prompt = len(prompt_ids)
        mask = [False] * n_prompt + [True] * (len(ids) - n_prompt)
        out.append(EncodedSFT(ids, mask, n_prompt, ex.source))
    return out, report


def _prompt_and_source(item: Any, index: int) -> tuple[str | list[dict], str]:
    """(prompt, source) of a `PromptExample`-like item or of a bare prompt."""
    if hasattr(item, "prompt"):
        return item.prompt, getattr(item, "source", f"prompt[{index}]")
    return item, f"prompt[{index}]"


def encode_prompts(
    tokenizer: Any, prompts: Iterable, max_prompt_len: int, add_bos: bool = True
) -> tuple[list[list[int]], TruncationReport]:
    """Encode prompts for generation: `[bos] prompt`, left-truncated to `max_prompt_len`.

    Items are `PromptExample`s (or anything with `.prompt`), strings or messages lists.
    """
    bos = _bos(tokenizer, add_bos)
    _check_lengths(max_prompt_len, None, bos)
    pairs = [_prompt_and_source(item, i) for i, item in enumerate(prompts)]
    report = TruncationReport("prompts", max_prompt_len, total=len(pairs))
    texts = _format_all(tokenizer, [prompt for prompt, _ in pairs], [src for _, src in pairs])
    return [
        _prompt_ids(ids, bos, max_prompt_len, source, report)
        for ids, (_, source) in zip(_tokenize(tokenizer, texts), pairs)
    ], report


def encode_pairs(
    tokenizer: Any, pairs: Sequence, max_prompt_len: int, max_len: int, add_bos: bool = True
) -> tuple[list[EncodedPair], TruncationReport]:
    """Encode `PreferencePair`s as two full sequences `[bos] prompt response eos`.

    A pair is dropped when either side has no response token left, or when truncation made
    chosen and rejected identical (the comparison would then carry no signal).
    """
    bos, eos = _bos(tokenizer, add_bos), _eos(tokenizer)
    _check_lengths(max_prompt_len, max_len, bos)
    report = TruncationReport("preference pairs", max_prompt_len, max_len, total=len(pairs))
    prompts = _tokenize(
        tokenizer, _format_all(tokenizer, [p.prompt for p in pairs], [p.source for p in pairs])
    )
    chosen = _tokenize(tokenizer, [p.chosen for p in pairs])
    rejected = _tokenize(tokenizer, [p.rejected for p in pairs])
    out = []
    for pair, prompt_ids, chosen_ids, rejected_ids in zip(pairs, prompts, chosen, rejected):
        prompt_ids = _prompt_ids(prompt_ids, bos, max_prompt_len, pair.source, report)
        chosen_seq = _sequence(prompt_ids, chosen_ids, eos, max_len, report)
        rejected_seq = _sequence(prompt_ids, rejected_ids, eos, max_len, report)
        if chosen_seq is None or rejected_seq is None:
            report.dropped_no_response += 1
            _note_drop(report, pair.source)
            continue
        if chosen_seq == rejected_seq:
            report.dropped_identical += 1
            _note_drop(report, pair.source)
            continue
        out.append(
            EncodedPair(
                chosen_seq, rejected_seq, len(prompt_ids), pair.source, getattr(pair, "group", None)
            )
        )
    return out, report


def encode_texts(
    tokenizer: Any, texts: Iterable, max_len: int, add_bos: bool = True, knobs: str = "max_len"
) -> tuple[list[list[int]], TruncationReport]:
    """Encode pretraining texts (PPO-ptx) as `[bos] text eos`, cut on the right to `max_len`.

    Items are `TextExample`s (anything with `.text`) or strings. BOS and EOS as in every SFT and
    RL sequence, so the LM loss trains the same boundaries the policy is sampled with. A text cut
    at `max_len` loses its eos and is counted; `knobs` names the settings that set `max_len`, for
    the report's "raise ... to keep more".
    """
    bos, eos = _bos(tokenizer, add_bos), _eos(tokenizer)
    least = 2 if bos is not None else 1
    if max_len < least:
        raise UserError(
            f"{knobs}: the pretraining texts are cut to {max_len} tokens; it must be at least "
            f"{least} to hold a token" + (" after the bos token" if bos is not None else "")
        )
    texts = [getattr(item, "text", item) for item in texts]
    report = TruncationReport("pretraining texts", 0, max_len, total=len(texts), knobs=knobs)
    out = []
    for ids in _tokenize(tokenizer, texts):
        full = ([bos] if bos is not None else []) + ids + [eos]
        if len(full) > max_len:
            report.texts_truncated += 1
            full = full[:max_len]
        out.append(full)
    return out, report


def check_token_ids(
    records: Iterable, vocab_size: int, source: str, tokenizer_size: int | None = None
) -> None:
    """Raise `UserError` naming the first record with a token id outside [0, vocab_size).

    `records`: encoded examples (`EncodedSFT`, `EncodedPair`: their `source` file:line names the
    record), id lists or a (B, T) tensor, one record each; or a single flat id list. Every record
    is checked (its min and max id: cheap). This catches a tokenizer that does not belong to the
    model before it becomes an index error deep inside an embedding lookup.
    """
    if hasattr(records, "tolist"):
        records = records.tolist()
    records = list(records)
    single = bool(records) and isinstance(records[0], int)  # one flat record: `source` names it
    if single:
        records = [records]
    for index, record in enumerate(records):
        ids = _record_ids(record)
        if not ids:
            continue
        low, high = min(ids), max(ids)
        if low >= 0 and high < vocab_size:
            continue
        bad = high if high >= vocab_size else low
        where = getattr(record, "source", None) or (
            source if single else f"{source}, record {index + 1}"
        )
        size = tokenizer_size if tokenizer_size is not None else f"at least {high + 1}"
        raise UserError(
            f"{where}: token id {bad} is outside the model's vocabulary: the tokenizer "
            f"has {size} tokens but the model's vocabulary is {vocab_size}; use the "
            "tokenizer saved with the model"
        )


def _record_ids(record: Any) -> list[int]:
    """The token ids of one record: an encoded example's sequences or a (nested) id list."""
    if isinstance(record, EncodedSFT):
        return record.input_ids
    if isinstance(record, EncodedPair):
        return record.chosen_ids + record.rejected_ids
    return _flatten(record)


def _flatten(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    flat: list[int] = []
    for item in ids:
        flat.extend(_flatten(item) if not isinstance(item, int) else [item])
    return flat
