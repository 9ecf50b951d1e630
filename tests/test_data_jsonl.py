"""Tests of ppo_rlhf.data.jsonl: formats, reports, and an error for every kind of bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppo_rlhf.data import jsonl
from ppo_rlhf.data.jsonl import (
    PreferencePair,
    PromptExample,
    SFTExample,
    TextExample,
    load_records,
    read_preferences,
    read_prompts,
    read_sft,
    read_texts,
)
from ppo_rlhf.errors import UserError

READERS = [read_sft, read_preferences, read_prompts, read_texts]


def write_lines(path: Path, *lines) -> Path:
    """Write each line (a dict becomes JSON, a str is written verbatim) to `path`."""
    text = "".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(reader, path) -> str:
    with pytest.raises(UserError) as info:
        reader(path)
    return str(info.value)


# ---------------------------------------------------------------- formats


def test_sft_prompt_response_and_messages(tmp_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = write_lines(
        tmp_path / "sft.jsonl", {"prompt": "1+1?", "response": "2", "id": 7}, {"messages": chat}
    )
    examples, report = read_sft(path)
    assert examples == [
        SFTExample("1+1?", "2", f"{path}:1"),
        SFTExample(chat[:2], "4", f"{path}:2"),
    ]
    assert (report.lines, report.records, report.examples) == (2, 2, 2)


def test_preferences_and_ranking_expand_to_all_pairs(tmp_path):
    path = write_lines(
        tmp_path / "prefs.jsonl",
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "responses": ["a", "b", "c", "d"]},
    )
    pairs, report = read_preferences(path)
    assert pairs[0] == PreferencePair("p", "good", "bad", f"{path}:1", group=0)
    ranked = pairs[1:]
    assert len(ranked) == math.comb(4, 2)
    assert {(p.chosen, p.rejected) for p in ranked} == {
        ("a", "b"),
        ("a", "c"),
        ("a", "d"),
        ("b", "c"),
        ("b", "d"),
        ("c", "d"),
    }
    assert {p.group for p in ranked} == {1} and {p.source for p in ranked} == {f"{path}:2"}
    assert (report.records, report.examples, report.rankings) == (2, 7, 1)
    assert "1 rankings expanded" in report.describe()


def test_preferences_accept_a_messages_prompt(tmp_path):
    prompt = [{"role": "user", "content": "hi"}]
    path = write_lines(tmp_path / "p.jsonl", {"prompt": prompt, "chosen": "a", "rejected": "b"})
    assert read_preferences(path)[0][0].prompt == prompt


def test_prompts_texts_and_sft_file_as_prompts(tmp_path):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = write_lines(
        tmp_path / "prompts.jsonl",
        {"prompt": "x", "response": "ignored"},
        {"messages": chat},
        {"messages": chat[:1] + [{"role": "user", "content": "more"}]},
    )
    prompts, _ = read_prompts(path)
    assert prompts == [
        PromptExample("x", f"{path}:1"),
        PromptExample(chat[:1], f"{path}:2"),
        PromptExample([chat[0], {"role": "user", "content": "more"}], f"{path}:3"),
    ]
    texts, _ = read_texts(write_lines(tmp_path / "t.jsonl", {"text": "once upon"}))
    assert texts == [TextExample("once upon", f"{tmp_path / 't.jsonl'}:1")]


def test_blank_lines_crlf_bom_and_odd_unicode_are_fine(tmp_path):
    path = tmp_path / "sft.jsonl"
    odd = "NUL\x00 RTL \u202eעברית\u202c emoji \U0001f600"
    body = "\r\n".join(
        [
            json.dumps({"prompt": odd, "response": "ok"}, ensure_ascii=False),
            "",
            "   ",
            json.dumps({"prompt": "b", "response": "c"}),
        ]
    )
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8") + b"\r\n")
    examples, report = read_sft(path)
    assert [e.prompt for e in examples] == [odd, "b"]
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:4"]
    assert (report.lines, report.blank_lines) == (4, 2)
    assert "skipped 2 blank lines" in report.describe()


def test_exact_duplicates_are_kept_and_reported(tmp_path):
    record = {"prompt": "p", "response": "r"}
    path = write_lines(
        tmp_path / "sft.jsonl",
        record,
        {"prompt": "q", "response": "r"},
        {**record, "id": 3},
        record,
    )
    examples, report = read_sft(path)
    assert [e.source for e in examples] == [f"{path}:{i}" for i in (1, 2, 3, 4)]
    assert report.duplicates == 2
    assert f"{path}:3 repeats {path}:1" in report.describe()
    assert "2 exact duplicates kept" in report.describe()


def test_empty_preference_response_is_kept_and_counted(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_text('{"prompt": "p", "chosen": "a", "rejected": ""}\n')
    pairs, report = read_preferences(p)
    assert pairs[0].rejected == "" and report.empty_fields == 1


def test_empty_system_message_is_counted_not_an_error(tmp_path):
    chat = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    _, report = read_sft(write_lines(tmp_path / "sft.jsonl", {"messages": chat}))
    assert report.empty_fields == 1
    assert "1 empty message contents or responses kept" in report.describe()


def test_load_records_dispatches_and_rejects_unknown_kind(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", {"text": "a"})
    assert load_records(path, "texts")[0] == [TextExample("a", f"{path}:1")]
    with pytest.raises(UserError, match="unknown data kind .*sft, preferences, prompts, texts"):
        load_records(path, "pairs")


# ---------------------------------------------------------------- errors

BAD_RECORDS = [
    (
        read_preferences,
        {"prompt": "p", "rejected": "r"},
        r':1: field "chosen" is missing '
        r'\(expected \{"prompt": str, "chosen": str, "rejected": str\}',
    ),
    (
        read_sft,
        {"prompt": "p", "response": 3},
        r':1: field "response" is a number \(3\), expected a string',
    ),
    (read_sft, {"prompt": "", "response": "r"}, r':1: field "prompt" is empty'),
    (read_sft, {"prompt": "  \n", "response": "r"}, r':1: field "prompt" is empty'),
    (read_sft, {"prompt": "p", "response": ""}, r':1: field "response" is empty'),
    (
        read_preferences,
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        r':1: fields "chosen" and "rejected" are identical',
    ),
    (
        read_preferences,
        {"prompt": "p", "responses": ["only one"]},
        r':1: field "responses" has 1 response\(s\); a ranking needs at least 2',
    ),
    (
        read_preferences,
        {"prompt": "p", "responses": ["a", "b", "a"]},
        r"same text at positions 0 and 2",
    ),
    (
        read_preferences,
        {"prompt": "p", "responses": ["a", None]},
        r'field "responses"\[1\] is null, expected a string',
    ),
    (
        read_preferences,
        {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
        r'field "chosen" is an array; conversational',
    ),
    (
        read_sft,
        {"messages": [{"role": "user", "content": "q"}]},
        r'last message of "messages" has role "user"',
    ),
    (read_sft, {"messages": [{"role": "assistant", "content": "a"}]}, r"empty prompt"),
    (
        read_sft,
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        r'field "messages"\[0\]\.role is "robot"; it must be one of',
    ),
    (
        read_sft,
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
        r'field "messages"\[0\]\.content is missing',
    ),
    (read_sft, {"messages": "hello"}, r'field "messages" is a string, expected an array'),
    (read_sft, {"messages": [], "x": 1}, r'field "messages" is an empty array'),
    (read_sft, {"prompt": "p", "response": "r", "messages": []}, r'both "messages" and "prompt"'),
    (read_prompts, {"prompt": {"text": "p"}}, r'field "prompt" is an object'),
    (read_prompts, {"prompt": True}, r'field "prompt" is a boolean \(true\)'),
    (read_texts, {"txt": "a"}, r':1: field "text" is missing \(expected \{"text": str\}\)'),
    (read_texts, {"text": "a\ud800b"}, r'field "text" contains an unpaired surrogate "\\ud800"'),
]


@pytest.mark.parametrize("reader, record, pattern", BAD_RECORDS)
def test_bad_record_names_file_line_and_field(tmp_path, reader, record, pattern):
    path = write_lines(tmp_path / "data.jsonl", record)
    message = error_of(reader, path)
    assert message.startswith(f"{path}:1: "), message
    assert re.search(pattern, message), message


@pytest.mark.parametrize(
    "line, pattern",
    [
        ('{"prompt": "p", "response": }', r":2: invalid JSON at column 29: Expecting value"),
        ('{"prompt": "p"', r":2: invalid JSON at column 15"),
        ("[1, 2]", r":2: line is an array, expected a JSON object like \{\"prompt\""),
        ('"just a string"', r":2: line is a string, expected a JSON object"),
        ("42", r":2: line is a number"),
        ('[{"prompt": "a", "response": "b"}]', r":2: line is a JSON array of objects.*jq -c"),
        ("[" * 100_000, r":2: invalid JSON: nested too deeply"),
        ("9" * 5000, r":2: invalid JSON: Exceeds the limit"),
    ],
)
def test_malformed_lines(tmp_path, line, pattern):
    path = write_lines(tmp_path / "sft.jsonl", {"prompt": "ok", "response": "ok"}, line)
    message = error_of(read_sft, path)
    assert re.search(pattern, message), message


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    message = error_of(read_sft, path)
    assert message.startswith(f"{path}:2: line is not valid UTF-8 (byte 0xe9 at byte 16)")
    assert "UTF-8 encoding" in message


def test_missing_file_directory_and_empty_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert error_of(read_sft, missing) == (
        f"no such file: {missing}; create it with `ppo-rlhf data --task arithmetic --out DIR`"
    )
    assert f"{tmp_path} is a directory, expected a .jsonl file" in error_of(read_sft, tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert error_of(read_prompts, empty).startswith(f"{empty}: no records (the file is empty")
    empty.write_bytes(b"\n  \n\r\n")
    assert "no records" in error_of(read_prompts, empty)


def test_huge_line_is_an_error_and_reading_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 100)
    path = write_lines(tmp_path / "t.jsonl", {"text": "x" * 500}, {"text": "fine"}, {"text": 7})
    message = error_of(read_texts, path)
    assert f"{path}:1: line is 512 bytes, longer than the 100 bytes limit" in message
    assert f'{path}:3: field "text" is a number' in message
    assert f"{path}:2" not in message
    assert message.startswith(f"{path}: 2 problems in the data:")


def test_real_ten_megabyte_line_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "' + b"x" * (jsonl.MAX_LINE_BYTES + 10) + b'"}')
    assert "MB limit" in error_of(read_texts, path)


def test_errors_are_collected_with_and_n_more(tmp_path):
    path = write_lines(
        tmp_path / "prefs.jsonl",
        *[{"prompt": "p", "chosen": "c"} for _ in range(8)],
        {"prompt": "p", "chosen": "c", "rejected": "r"},
    )
    message = error_of(read_preferences, path)
    lines = message.splitlines()
    assert lines[0] == f"{path}: 8 problems in the data:"
    assert [line.strip().split(": ")[0] for line in lines[1:6]] == [
        f"{path}:{i}" for i in range(1, 6)
    ]
    assert lines[-1].strip() == "(and 3 more)"


# ---------------------------------------------------------------- saved HF datasets


def test_saved_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    directory = tmp_path / "ds"
    datasets.Dataset.from_list(
        [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    ).save_to_disk(str(directory))
    examples, report = read_sft(directory)
    assert examples == [
        SFTExample("a", "b", f"{directory}[row 0]"),
        SFTExample("c", "d", f"{directory}[row 1]"),
    ]
    assert report.records == 2
    bad = tmp_path / "bad"
    datasets.Dataset.from_list([{"prompt": "a", "response": ""}]).save_to_disk(str(bad))
    assert error_of(read_sft, bad).startswith(f'{bad}[row 0]: field "response" is empty')


def test_saved_dataset_without_datasets_installed(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    (tmp_path / "state.json").write_text("{}")
    assert "pip install 'ppo-rlhf[datasets]'" in error_of(read_sft, tmp_path)


# ---------------------------------------------------------------- properties

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "prompt",
                    "response",
                    "chosen",
                    "rejected",
                    "responses",
                    "messages",
                    "text",
                    "role",
                    "content",
                    "x",
                ]
            )
            | st.text(),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)
# Odd text: NUL and control characters, right-to-left marks, astral emoji, lone surrogates.
ODD = [
    "\x00",
    "\x1b",
    "\u202e",
    "\u200f",
    "\ufeff",
    "\u2028",
    "\ud800",
    "\udfff",
    "\U0001f600",
    "\r",
    "\n",
    " ",
]
odd_text = st.text(
    alphabet=st.sampled_from(ODD) | st.characters(codec=None, exclude_categories=()), max_size=8
)
some_text = st.text(min_size=1, max_size=8).filter(str.strip) | odd_text
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": some_text}
    ),
    min_size=1,
    max_size=4,
)
VALID_RECORDS = {
    read_sft: st.fixed_dictionaries({"prompt": some_text, "response": some_text})
    | st.builds(
        lambda m, a: {"messages": m + [{"role": "assistant", "content": a}]}, messages, some_text
    ),
    read_preferences: st.fixed_dictionaries(
        {"prompt": some_text | messages, "chosen": some_text, "rejected": some_text}
    )
    | st.fixed_dictionaries(
        {"prompt": some_text, "responses": st.lists(some_text, min_size=2, max_size=4)}
    ),
    read_prompts: st.fixed_dictionaries({"prompt": some_text})
    | st.builds(lambda m: {"messages": m}, messages),
    read_texts: st.fixed_dictionaries({"text": some_text}),
}


@st.composite
def records_for(draw, reader):
    """A record that is valid for `reader`, then (half the time) broken in one random way."""
    record = draw(VALID_RECORDS[reader])
    mutation = draw(st.sampled_from(["none", "none", "drop", "replace", "empty"]))
    key = draw(st.sampled_from(sorted(record)))
    if mutation == "drop":
        del record[key]
    elif mutation == "replace":
        record[key] = draw(json_values)
    elif mutation == "empty":
        record[key] = ""
    return record


def assert_valid_or_user_error(reader, path):
    """Reading gives well-formed examples or a UserError -- nothing else."""
    try:
        examples, report = reader(path)
    except UserError as err:
        assert str(err)
        str(err).encode("utf-8")  # printable
        return
    assert examples and report.examples == len(examples)
    for example in examples:
        assert example.source.startswith(f"{path}:")
        for value in vars(example).values():
            if isinstance(value, str):
                value.encode("utf-8")
    for example in examples:
        if isinstance(example, SFTExample):
            assert example.response.strip()
        if isinstance(example, PreferencePair):
            assert example.chosen != example.rejected


@FAST
@given(data=st.binary(max_size=300), reader=st.sampled_from(READERS))
def test_random_bytes_give_examples_or_user_error(tmp_path, data, reader):
    path = tmp_path / "random.jsonl"
    path.write_bytes(data)
    assert_valid_or_user_error(reader, path)


@FAST
@given(values=st.lists(json_values, min_size=0, max_size=5), reader=st.sampled_from(READERS))
def test_random_json_values_give_examples_or_user_error(tmp_path, values, reader):
    path = tmp_path / "values.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    assert_valid_or_user_error(reader, path)


@FAST
@given(data=st.data(), reader=st.sampled_from(READERS), ascii_only=st.booleans())
def test_random_records_give_examples_or_user_error(tmp_path, data, reader, ascii_only):
    rows = data.draw(st.lists(records_for(reader), min_size=1, max_size=4))
    path = tmp_path / "records.jsonl"
    # ensure_ascii=True writes lone surrogates as \\udXXX escapes that JSON decodes back.
    text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows)
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    assert_valid_or_user_error(reader, path)
