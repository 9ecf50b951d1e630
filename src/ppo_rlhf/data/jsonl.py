"""Read JSON Lines data files (and saved HF `datasets` directories) into typed examples.

Formats (one JSON object per line; extra keys such as "id" are ignored, except in prompts):

    SFT          {"prompt": str, "response": str}
                 {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                 (the last message is the assistant's answer; the ones before it are the prompt)
    preferences  {"prompt": str, "chosen": str, "rejected": str}
                 {"prompt": str, "responses": [best, ..., worst]}   (a ranking, K >= 2: expanded
                 into all C(K, 2) pairs, which share a `group` so a trainer can keep them together)
    prompts      {"prompt": str}  or  {"messages": [...]}  (an SFT file works too: the answer is
                 dropped); any other keys, e.g. {"prompt": ..., "answer": "42"}, are kept as the
                 example's `fields` for reward functions and gold rewards
    texts        {"text": str}    (pretraining text for PPO-ptx)

Wherever a prompt is expected, a messages list may stand instead of a string.

Every problem a user can make in such a file raises `UserError` naming `file:line`, the field,
what is wrong and how to fix it; up to `MAX_ERRORS` problems are listed in one message. Files are
read line by line in binary mode, so a line longer than `MAX_LINE_BYTES` is an error rather than
a memory blow-up, and undecodable bytes are reported with their line.

Exact duplicates (records that give the same training content) are counted and named in the
`ReadReport` but kept: in generated or sampled data, repetition is the data's distribution (a
demonstration written twice weighs twice), and dropping repeats would skew it towards the rare
records. `ReadReport.describe()` says so in a sentence for the run log.

    examples, report = read_preferences("data/prefs.jsonl")
    print(report.describe())
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from ppo_rlhf.errors import UserError

MAX_LINE_BYTES = 10 * 1024 * 1024
"""Longest accepted line; longer ones are reported instead of being loaded into memory."""

MAX_ERRORS = 5
"""How many problems one error message lists before summarising the rest as "(and N more)"."""

ROLES = ("system", "user", "assistant")

CREATE_HINT = "create it with `ppo-rlhf data --task arithmetic --out DIR`"

EXPECTED = {
    "sft": '{"prompt": str, "response": str} or {"messages": [{"role": ..., "content": ...}, ...]}',
    "preferences": '{"prompt": str, "chosen": str, "rejected": str} or '
    '{"prompt": str, "responses": [best, ..., worst]}',
    "prompts": '{"prompt": str} or {"messages": [{"role": ..., "content": ...}, ...]}',
    "texts": '{"text": str}',
}


@dataclass(frozen=True)
class SFTExample:
    """A demonstration: the prompt (text or chat messages) and the response to imitate."""

    prompt: str | list[dict]
    response: str
    source: str


@dataclass(frozen=True)
class PreferencePair:
    """A comparison: `chosen` is preferred to `rejected` for `prompt`.

    `group` numbers the record the pair came from: all C(K, 2) pairs of one ranking share it
    (InstructGPT trains on them together). `None` means the pair is its own group.
    """

    prompt: str | list[dict]
    chosen: str
    rejected: str
    source: str
    group: int | None = None


@dataclass(frozen=True)
class PromptExample:
    """A prompt for PPO rollouts or evaluation.

    `fields` holds the row's other keys as read (e.g. `{"answer": "42"}` from
    `{"prompt": "Q: 40+2=", "answer": "42"}`): reward functions and gold rewards receive them.
    """

    prompt: str | list[dict]
    source: str
    fields: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class TextExample:
    """Plain text for the pretraining (PPO-ptx) loss."""

    text: str
    source: str


def prompt_text(example: SFTExample | PreferencePair | PromptExample | str | list[dict]) -> str:
    """The prompt as plain text, for gold rewards, reward functions and sample logs: the string
    itself, or the last message's content of a messages list (the question being answered).

    `example` is an example read from a file or its `.prompt`. What the model reads is
    `data.encode.format_prompt` (chat template or joined messages); this is the question alone.
    """
    prompt = getattr(example, "prompt", example)
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


@dataclass
class ReadReport:
    """What reading one data file found; `describe()` is the sentence for the run log.

    `records` counts the JSON objects read, `examples` what was returned (rankings expand into
    several pairs; duplicates are kept and counted). `empty_fields` counts tolerated empty strings (the
    content of a system or earlier message, or an empty chosen/rejected response); empty prompts and
    SFT responses are errors instead.
    """

    path: str
    kind: str
    lines: int = 0
    records: int = 0
    examples: int = 0
    blank_lines: int = 0
    duplicates: int = 0
    empty_fields: int = 0
    rankings: int = 0
    duplicate_examples: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One human sentence, e.g. for the console and the metrics log."""
        unit = {
            "sft": "SFT examples",
            "preferences": "preference pairs",
            "prompts": "prompts",
            "texts": "texts",
        }[self.kind]
        parts = [
            f"{self.path}: read {self.records} records from {self.lines} lines "
            f"-> {self.examples} {unit}"
        ]
        if self.rankings:
            parts.append(f"{self.rankings} rankings expanded into all their pairs")
        if self.blank_lines:
            parts.append(f"skipped {self.blank_lines} blank lines")
        if self.duplicates:
            shown = ", ".join(self.duplicate_examples)
            more = " ..." if self.duplicates > len(self.duplicate_examples) else ""
            parts.append(f"{self.duplicates} exact duplicates kept ({shown}{more})")
        if self.empty_fields:
            parts.append(f"{self.empty_fields} empty message contents or responses kept")
        return "; ".join(parts)


class _Invalid(Exception):
    """One problem with one record; collected, then raised together as a `UserError`."""


class _Missing(_Invalid):
    """A required field is absent; the message gets the expected format appended."""


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type, as a user reading the file would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: Any, limit: int = 40) -> str:
    """A short ASCII rendering of a user value for an error message.

    ASCII so that odd input (lone surrogates, control or right-to-left characters) cannot break
    the terminal printing the error.
    """
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _string(record: dict, key: str, *, where: str | None = None, allow_empty: bool = False) -> str:
    """`record[key]` checked to be a valid, non-empty string."""
    name = where or f'field "{key}"'
    if key not in record:
        raise _Missing(f"{name} is missing")
    return _check_text(record[key], name, allow_empty=allow_empty)


def _check_text(value: Any, name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        shown = "" if value is None else f" ({_show(value)})"
        raise _Invalid(f"{name} is {_json_type(value)}{shown}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _Invalid(
            f"{name} contains an unpaired surrogate {_show(value[err.start])} at character "
            f"{err.start}, which is not valid Unicode; fix the escape sequence in the file"
        ) from None
    if not allow_empty and not value.strip():
        raise _Invalid(f"{name} is empty; remove the record or fill it in")
    return value


def _messages(value: Any, name: str = 'field "messages"') -> list[dict]:
    """A validated chat: a non-empty list of {"role", "content"} objects, copied."""
    if not isinstance(value, list):
        raise _Invalid(
            f"{name} is {_json_type(value)}, expected an array of "
            '{"role": "system"|"user"|"assistant", "content": str} objects'
        )
    if not value:
        raise _Invalid(f"{name} is an empty array; it needs at least one message")
    out = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise _Invalid(
                f"{where} is {_json_type(message)}, expected an object like "
                '{"role": "user", "content": "..."}'
            )
        role = message.get("role")
        if role not in ROLES:
            got = "missing" if "role" not in message else _show(role)
            raise _Invalid(
                f'{where}.role is {got}; it must be one of "system", "user", "assistant"'
            )
        content = _string(message, "content", where=f"{where}.content", allow_empty=True)
        out.append({"role": role, "content": content})
    return out


def _count_empty(messages: list[dict]) -> int:
    return sum(1 for m in messages if not m["content"].strip())


def _prompt(record: dict, key: str = "prompt") -> str | list[dict]:
    """A prompt field: a non-empty string, or a messages list with some content."""
    if key in record and isinstance(record[key], list):
        messages = _messages(record[key], f'field "{key}"')
        if _count_empty(messages) == len(messages):
            raise _Invalid(f'field "{key}" is empty: every message has empty content')
        return messages
    return _string(record, key)


def _split_chat(messages: list[dict]) -> tuple[list[dict], str]:
    """(prompt conversation, final assistant answer) of an SFT messages record."""
    last = messages[-1]
    if last["role"] != "assistant":
        raise _Invalid(
            f'the last message of "messages" has role "{last["role"]}"; an SFT record '
            'must end with the "assistant" answer to learn'
        )
    response = _check_text(last["content"], f'field "messages"[{len(messages) - 1}].content')
    prompt = messages[:-1]
    if not prompt or _count_empty(prompt) == len(prompt):
        raise _Invalid(
            'empty prompt: "messages" needs a non-empty message before the final assistant answer'
        )
    return prompt, response


def _one_of(record: dict, keys: tuple[str, str]) -> str:
    """Which of two alternative field names the record uses; both or neither is an error."""
    a, b = keys
    if a in record and b in record:
        raise _Invalid(f'both "{a}" and "{b}" are present; use one of them')
    return a if a in record else b


def _parse_sft(record: dict) -> tuple[list[tuple], int]:
    if _one_of(record, ("messages", "prompt")) == "messages":
        messages = _messages(record["messages"])
        prompt, response = _split_chat(messages)
        return [(prompt, response)], _count_empty(prompt)
    prompt = _prompt(record)
    return [(prompt, _string(record, "response"))], 0


def _parse_preferences(record: dict) -> tuple[list[tuple], int]:
    prompt = _prompt(record)
    empty = _count_empty(prompt) if isinstance(prompt, list) else 0
    if "responses" in record and ("chosen" in record or "rejected" in record):
        raise _Invalid(
            'both "responses" (a ranking) and "chosen"/"rejected" are present; use one form'
        )
    if "responses" in record:
        ranked = record["responses"]
        if not isinstance(ranked, list):
            raise _Invalid(
                f'field "responses" is {_json_type(ranked)}, expected an array of '
                "strings ordered best to worst"
            )
        if len(ranked) < 2:
            raise _Invalid(
                f'field "responses" has {len(ranked)} response(s); a ranking needs at '
                "least 2, ordered best to worst"
            )
        texts = [_check_text(r, f'field "responses"[{i}]') for i, r in enumerate(ranked)]
        for i, j in combinations(range(len(texts)), 2):
            if texts[i] == texts[j]:
                raise _Invalid(
                    f'field "responses" has the same text at positions {i} and {j}; '
                    "a ranking needs distinct responses"
                )
        return [(prompt, texts[i], texts[j]) for i, j in combinations(range(len(texts)), 2)], empty
    for key in ("chosen", "rejected"):
        if isinstance(record.get(key), list):
            raise _Invalid(
                f'field "{key}" is an array; conversational chosen/rejected are not '
                'supported: put the conversation in "prompt" as a messages list and '
                "the answers in chosen/rejected as strings"
            )
    # An empty response (the policy stopped at once) is a legitimate thing to compare: kept, counted.
    chosen = _string(record, "chosen", allow_empty=True)
    rejected = _string(record, "rejected", allow_empty=True)
    empty += (not chosen.strip()) + (not rejected.strip())
    if chosen == rejected:
        raise _Invalid(
            'fields "chosen" and "rejected" are identical, so the pair says nothing; '
            "remove the record or fix one of the responses"
        )
    return [(prompt, chosen, rejected)], empty


def _parse_prompts(record: dict) -> tuple[list[tuple], int]:
    if _one_of(record, ("messages", "prompt")) == "messages":
        messages = _messages(record["messages"])
        if messages[-1]["role"] == "assistant":
            # An SFT file given as prompts: keep the conversation, drop the answer.
            messages = messages[:-1]
        if _count_empty(messages) == len(messages):
            raise _Invalid(
                'empty prompt: "messages" has no non-empty message before the assistant\'s turn'
            )
        return [(messages,)], _count_empty(messages)
    prompt = _prompt(record)
    return [(prompt,)], _count_empty(prompt) if isinstance(prompt, list) else 0


def _parse_texts(record: dict) -> tuple[list[tuple], int]:
    return [(_string(record, "text"),)], 0


_PARSERS: dict[str, tuple[Callable[[dict], tuple[list[tuple], int]], type]] = {
    "sft": (_parse_sft, SFTExample),
    "preferences": (_parse_preferences, PreferencePair),
    "prompts": (_parse_prompts, PromptExample),
    "texts": (_parse_texts, TextExample),
}


def _decode_line(raw: bytes) -> Any:
    """JSON value of one line's bytes, or `_Invalid` saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Invalid(
            f"line is not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte "
            f"{err.start + 1}); re-save the file with UTF-8 encoding"
        ) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise _Invalid("invalid JSON: nested too deeply") from None
    except ValueError as err:
        where = f" at column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        msg = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
        raise _Invalid(
            f"invalid JSON{where}: {msg}; each line must be one complete JSON object"
        ) from None


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MB" if n_bytes >= 2**20 else f"{n_bytes} bytes"


def _file_lines(path: Path, display: str) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(source, line bytes or None, error) per line of a file, reading at most one line at once.

    A line longer than `MAX_LINE_BYTES` yields an error and is skipped without being held.
    """
    limit = MAX_LINE_BYTES
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"no such file: {display}; {CREATE_HINT}") from None
    except IsADirectoryError:
        raise UserError(
            f"{display} is a directory, expected a .jsonl file (one JSON object per "
            "line) or a directory saved with datasets' save_to_disk"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read {display}: {err.strerror}") from None
    except ValueError as err:  # e.g. a NUL byte in the path
        raise UserError(f"cannot read {_show(display, 200)}: {err}") from None
    with handle:
        number = 0
        while True:
            line = handle.readline(limit + 1)
            if not line:
                return
            number += 1
            source = f"{display}:{number}"
            if len(line) > limit and not line.endswith(b"\n"):
                size = len(line)
                while line and not line.endswith(b"\n"):
                    line = handle.readline(1 << 20)
                    size += len(line)
                size -= line.endswith(b"\n")
                problem = (
                    f"line is {_size(size)}, longer than the {_size(limit)} limit; check that "
                    "the file is JSON Lines (one object per line) and split huge records"
                )
                yield source, None, problem
                continue
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark, as some editors write
            yield source, line.rstrip(b"\r\n"), None


def _looks_like_saved_dataset(path: Path) -> bool:
    return any(
        (path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _dataset_rows(path: Path, display: str) -> Iterator[tuple[str, dict, None]]:
    """(source, row, None) for each row of a directory written by `Dataset.save_to_disk`."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{display} is a saved HF datasets directory but the `datasets` package "
            "is not installed; pip install 'ppo-rlhf[datasets]'"
        ) from None
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise UserError(
            f"{display} holds several splits ({', '.join(splits)}); point to one of "
            f"them, e.g. {display}/{splits[0] if splits else 'train'}"
        )
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # the library raises many types for a damaged directory
        raise UserError(f"cannot load the saved dataset {display}: {err}") from None
    for i, row in enumerate(dataset):
        # Arrow fills a column that other rows have with None: treat it as absent.
        yield f"{display}[row {i}]", {k: v for k, v in row.items() if v is not None}, None


def _content_key(values: tuple) -> str:
    return json.dumps(values, ensure_ascii=True, sort_keys=True)


def _format_errors(display: str, errors: list[str], total: int) -> str:
    if total == 1:
        return errors[0]
    more = f"\n  (and {total - len(errors)} more)" if total > len(errors) else ""
    return f"{display}: {total} problems in the data:\n  " + "\n  ".join(errors) + more


def load_records(path: str | Path, kind: str) -> tuple[list, ReadReport]:
    """Read `path` as `kind` ("sft", "preferences", "prompts" or "texts").

    `path` is a JSON Lines file, or a directory saved with `datasets`' `save_to_disk` (read
    only if `datasets` is installed; each row is treated as one JSON line, source "dir[row N]").
    Returns (examples, report); raises `UserError` listing the problems if any record is bad.
    """
    if kind not in _PARSERS:
        raise UserError(f"unknown data kind {_show(kind)}; expected one of {', '.join(_PARSERS)}")
    parse, make = _PARSERS[kind]
    display = str(path)
    path = Path(path)
    report = ReadReport(path=display, kind=kind)
    if path.is_dir() and _looks_like_saved_dataset(path):
        rows: Iterator = _dataset_rows(path, display)
    else:
        rows = _file_lines(path, display)

    examples: list = []
    seen: dict[str, str] = {}
    errors: list[str] = []
    n_errors = 0
    for source, line, problem in rows:
        report.lines += 1
        try:
            if problem is not None:
                raise _Invalid(problem)
            if isinstance(line, bytes):
                if not line.strip():
                    report.blank_lines += 1
                    continue
                record = _decode_line(line)
            else:
                record = line
            if isinstance(record, list) and record and all(isinstance(r, dict) for r in record):
                raise _Invalid(
                    "line is a JSON array of objects, expected one object per line; "
                    "convert with: jq -c '.[]' FILE.json > FILE.jsonl"
                )
            if not isinstance(record, dict):
                raise _Invalid(
                    f"line is {_json_type(record)}, expected a JSON object like {EXPECTED[kind]}"
                )
            report.records += 1
            items, empty = parse(record)
        except _Invalid as err:
            n_errors += 1
            if len(errors) < MAX_ERRORS:
                hint = f" (expected {EXPECTED[kind]})" if isinstance(err, _Missing) else ""
                errors.append(f"{source}: {err}{hint}")
            continue
        extra = {}
        if kind == "prompts":  # the row's other keys travel with the prompt (reward functions' fields)
            extra["fields"] = {k: v for k, v in record.items()
                               if k not in ("prompt", "messages", "response")}
        key = _content_key((tuple(items), extra.get("fields")))
        if key in seen:
            report.duplicates += 1
            if len(report.duplicate_examples) < 3:
                report.duplicate_examples.append(f"{source} repeats {seen[key]}")
        else:
            seen[key] = source
        report.empty_fields += empty
        if len(items) > 1:
            report.rankings += 1
        group = {"group": report.records - 1} if kind == "preferences" else {}
        examples.extend(make(*item, source, **group, **extra) for item in items)

    if n_errors:
        raise UserError(_format_errors(display, errors, n_errors))
    if not examples:
        raise UserError(
            f"{display}: no records (the file is empty or has only blank lines); "
            f"expected one JSON object per line like {EXPECTED[kind]}"
        )
    report.examples = len(examples)
    return examples, report


def read_sft(path: str | Path) -> tuple[list[SFTExample], ReadReport]:
    """SFT demonstrations from `path` (see the module docstring for the format)."""
    return load_records(path, "sft")


def read_preferences(path: str | Path) -> tuple[list[PreferencePair], ReadReport]:
    """Preference pairs from `path`; rankings are expanded into all C(K, 2) pairs."""
    return load_records(path, "preferences")


def read_prompts(path: str | Path) -> tuple[list[PromptExample], ReadReport]:
    """Prompts for rollouts from `path`; an SFT file works too (its responses are ignored)."""
    return load_records(path, "prompts")


def read_texts(path: str | Path) -> tuple[list[TextExample], ReadReport]:
    """Pretraining texts from `path`."""
    return load_records(path, "texts")
