"""Tests of ppo_rlhf.data.encode and ppo_rlhf.data.collate on a tiny word-level tokenizer.

Every word is one token, so lengths and truncation counts can be worked out by hand.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ppo_rlhf.data import (
    EncodedPair,
    EncodedSFT,
    PreferencePair,
    PromptExample,
    SFTExample,
    TextExample,
    batches,
    check_token_ids,
    collate_pairs,
    collate_prompts,
    collate_sft,
    encode_pairs,
    encode_prompts,
    encode_sft,
    encode_texts,
    format_prompt,
    pad_left,
    pad_right,
    position_ids_from_mask,
)
from ppo_rlhf.errors import UserError

WORDS = [
    "<pad>",
    "<unk>",
    "<bos>",
    "<eos>",
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "<",
    ">",
    "user",
    "assistant",
    "system",
]
ID = {w: i for i, w in enumerate(WORDS)}
PAD, UNK, BOS, EOS = 0, 1, 2, 3
A, B, C, D, E, F = (ID[w] for w in "abcdef")

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def word_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    model = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"bos_token": "<bos>"} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", **extra
    )


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


def sft(prompt, response, line=1):
    return SFTExample(prompt, response, f"sft.jsonl:{line}")


# ---------------------------------------------------------------- format_prompt


def test_format_prompt_without_template(tok):
    assert format_prompt(tok, "a b") == "a b"
    chat = [{"role": "system", "content": "a"}, {"role": "user", "content": "b c"}]
    assert format_prompt(tok, chat) == "a\nb c"
    assert format_prompt(tok, [{"role": "user", "content": "a b"}]) == format_prompt(tok, "a b")


def test_format_prompt_uses_the_chat_template(tok):
    tok.chat_template = TEMPLATE
    assert format_prompt(tok, "a b") == "<user>a b\n<assistant>"
    chat = [{"role": "system", "content": "c"}, {"role": "user", "content": "a"}]
    assert format_prompt(tok, chat) == "<system>c\n<user>a\n<assistant>"
    encoded, _ = encode_sft(tok, [sft("a", "b")], max_prompt_len=16, max_len=32)
    lt, gt = ID["<"], ID[">"]
    assert encoded[0].input_ids == [BOS, lt, ID["user"], gt, A, lt, ID["assistant"], gt, B, EOS]
    assert encoded[0].prompt_len == 8


def test_chat_template_error_names_the_source(tok):
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}{{ m.content }}"
        "{% endfor %}"
    )
    chat = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(
        UserError,
        match=r"^sft\.jsonl:4: the tokenizer's chat template rejects "
        r"this prompt: no system role",
    ):
        encode_sft(tok, [sft(chat, "c", line=4)], max_prompt_len=8, max_len=16)


def test_bos_written_by_the_template_is_not_doubled(tok):
    tok.chat_template = "{{ bos_token }}" + TEMPLATE
    ids, _ = encode_prompts(tok, ["a"], max_prompt_len=16)
    assert ids[0][:2] == [BOS, ID["<"]] and ids[0].count(BOS) == 1


# ---------------------------------------------------------------- encode_sft


def test_sft_sequence_and_loss_mask_cover_response_and_eos(tok):
    encoded, report = encode_sft(tok, [sft("a b", "c d")], max_prompt_len=8, max_len=16)
    assert encoded == [
        EncodedSFT(
            [BOS, A, B, C, D, EOS], [False, False, False, True, True, True], 3, "sft.jsonl:1"
        )
    ]
    assert (report.total, report.kept, report.prompts_truncated, report.responses_truncated) == (
        1,
        1,
        0,
        0,
    )
    assert report.describe() == "encoded 1 of 1 SFT examples"


def test_sft_without_bos(tok):
    encoded, _ = encode_sft(tok, [sft("a", "b")], max_prompt_len=4, max_len=8, add_bos=False)
    assert encoded[0].input_ids == [A, B, EOS] and encoded[0].prompt_len == 1
    no_bos = word_tokenizer(bos=False)
    assert encode_sft(no_bos, [sft("a", "b")], 4, 8)[0][0].input_ids == [A, B, EOS]


def test_sft_truncation_counts_by_hand(tok):
    examples = [
        sft("a b c d e", "f", 1),  # prompt 6 tokens with bos -> cut to [bos, d, e]
        sft("a", "b c d e f", 2),  # 2 + 5 + eos = 8 > 6 -> response cut, eos lost
        sft("a b", "c", 3),  # fits: 3 + 1 + 1 = 5
        sft("a b c d e f", "a b", 4),  # prompt cut to 3, 3 + 2 + eos = 6: fits exactly
    ]
    encoded, report = encode_sft(tok, examples, max_prompt_len=3, max_len=6)
    assert [e.input_ids for e in encoded] == [
        [BOS, D, E, F, EOS],
        [BOS, A, B, C, D, E],
        [BOS, A, B, C, EOS],
        [BOS, E, F, A, B, EOS],
    ]
    assert encoded[1].loss_mask == [False, False, True, True, True, True]
    for e in encoded:
        assert len(e.loss_mask) == len(e.input_ids)
        assert sum(e.loss_mask) == len(e.input_ids) - e.prompt_len
        assert not any(e.loss_mask[: e.prompt_len]) and all(e.loss_mask[e.prompt_len :])
    assert (report.prompts_truncated, report.responses_truncated, report.dropped) == (2, 1, 0)
    assert report.describe() == (
        "encoded 4 of 4 SFT examples; 2 prompts cut from the left to 3 tokens; 1 responses cut "
        "at 6 tokens (losing their eos) (raise max_prompt_len / max_len to keep more)"
    )


def test_sft_example_with_no_room_for_the_response_is_dropped(tok):
    examples = [sft("a b c", "d", 1), sft("a", "d", 2)]
    encoded, report = encode_sft(tok, examples, max_prompt_len=4, max_len=4)
    assert [e.source for e in encoded] == ["sft.jsonl:2"]
    assert (report.dropped_no_response, report.kept, report.dropped_sources) == (
        1,
        1,
        ["sft.jsonl:1"],
    )
    assert "1 dropped with no response token left" in report.describe()


@pytest.mark.parametrize(
    "max_prompt_len, max_len, pattern",
    [
        (1, 8, "max_prompt_len is 1; it must be at least 2"),
        (4, 2, "max_len is 2; it must be at least 3"),
    ],
)
def test_lengths_too_small_are_user_errors(tok, max_prompt_len, max_len, pattern):
    with pytest.raises(UserError, match=pattern):
        encode_sft(tok, [sft("a", "b")], max_prompt_len, max_len)


def test_prompt_with_no_tokens_names_its_source():
    model = Tokenizer(models.BPE(vocab={"a": 0, "<eos>": 1}, merges=[]))  # no unk: drops "z"
    bare = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>")
    with pytest.raises(UserError, match=r"^prompts\.jsonl:7: the prompt encodes to no tokens"):
        encode_prompts(bare, [PromptExample("zzz", "prompts.jsonl:7")], max_prompt_len=8)


# ---------------------------------------------------------------- encode_prompts / encode_pairs


def test_encode_prompts_left_truncates_and_accepts_bare_prompts(tok):
    prompts = [PromptExample("a b c d e", "p.jsonl:1"), "a", [{"role": "user", "content": "b"}]]
    ids, report = encode_prompts(tok, prompts, max_prompt_len=3)
    assert ids == [[BOS, D, E], [BOS, A], [BOS, B]]
    assert (report.total, report.prompts_truncated) == (3, 1)
    assert report.describe() == (
        "encoded 3 of 3 prompts; 1 prompts cut from the left to 3 tokens"
        " (raise max_prompt_len to keep more)"
    )


def test_encode_pairs(tok):
    pairs = [
        PreferencePair("a", "b c", "d", "prefs.jsonl:1", group=0),
        PreferencePair("a b c", "d e", "d f", "prefs.jsonl:2", group=1),  # same after cut
        PreferencePair("a", "b c d e", "f", "prefs.jsonl:3"),
    ]
    encoded, report = encode_pairs(tok, pairs, max_prompt_len=4, max_len=5)
    assert encoded == [
        EncodedPair([BOS, A, B, C, EOS], [BOS, A, D, EOS], 2, "prefs.jsonl:1", 0),
        EncodedPair([BOS, A, B, C, D], [BOS, A, F, EOS], 2, "prefs.jsonl:3", None),
    ]
    # Pair 2: [bos a b c] + "d e"/"d f" both cut to [bos a b c d]; pair 3: chosen cut.
    assert (report.responses_truncated, report.dropped_identical, report.kept) == (3, 1, 2)
    assert report.dropped_sources == ["prefs.jsonl:2"]
    assert "1 pairs dropped because chosen and rejected were identical" in report.describe()


def test_check_token_ids(tok):
    check_token_ids([[1, 2], [3]], vocab_size=4, source="model dir")
    check_token_ids(torch.tensor([0, 3]), vocab_size=4, source="model dir")
    with pytest.raises(
        UserError,
        match=(
            r"^sft\.jsonl:3: token id 9 is outside the model's vocabulary: the tokenizer has "
            r"15 tokens but the model's vocabulary is 8; use the tokenizer saved with the model"
        ),
    ):
        check_token_ids([1, 9], vocab_size=8, source="sft.jsonl:3", tokenizer_size=len(tok))
    with pytest.raises(UserError, match="token id -1 .*has at least 3 tokens"):
        check_token_ids([[-1, 2]], vocab_size=8, source="x")


# ---------------------------------------------------------------- collate


def test_pad_right_and_left():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and ids.dtype == torch.long
    assert mask.tolist() == [[True, True, True], [True, False, False]] and mask.dtype == torch.bool
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0, length=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True]]
    with pytest.raises(ValueError, match="shorter than the longest"):
        pad_right([[1, 2, 3]], 0, length=2)


def test_collate_sft():
    batch = [
        EncodedSFT([BOS, A, B, EOS], [False, False, True, True], 2, "s:1"),
        EncodedSFT([BOS, A, EOS], [False, True, True], 1, "s:2"),
    ]
    out = collate_sft(batch, pad_id=PAD)
    assert out["input_ids"].tolist() == [[BOS, A, B, EOS], [BOS, A, EOS, PAD]]
    assert out["attention_mask"].tolist() == [[True] * 4, [True, True, True, False]]
    assert out["loss_mask"].tolist() == [[False, False, True, True], [False, True, True, False]]
    assert out["loss_mask"].dtype == torch.bool


def test_collate_prompts_left_pads():
    out = collate_prompts([[BOS, A, B], [BOS]], pad_id=PAD)
    assert out["input_ids"].tolist() == [[BOS, A, B], [PAD, PAD, BOS]]
    assert out["attention_mask"].tolist() == [[True, True, True], [False, False, True]]


def test_collate_pairs_puts_chosen_rows_first():
    batch = [EncodedPair([1, 2, 3], [1, 4], 1, "p:1"), EncodedPair([5, 6], [5, 7, 8, 9], 1, "p:2")]
    out = collate_pairs(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 7, 8, 9]]
    assert out["attention_mask"].sum(1).tolist() == [3, 2, 2, 4]


def test_position_ids_from_mask_left_and_right():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert position_ids_from_mask(left).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    right = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    assert position_ids_from_mask(right).tolist() == [[0, 1, 2, 2, 2]]
    # A left-padded prompt followed by its response continues the prompt's positions.
    prompt_and_response = torch.tensor([[0, 1, 1, 1, 1, 0]])
    assert position_ids_from_mask(prompt_and_response).tolist() == [[0, 0, 1, 2, 3, 3]]


def test_batches():
    assert list(batches(5, 2, rng=None)) == [[0, 1], [2, 3], [4]]
    assert list(batches(5, 2, rng=None, drop_last=True)) == [[0, 1], [2, 3]]
    assert list(batches(0, 3, rng=None)) == []
    first = list(batches(10, 3, torch.Generator().manual_seed(0)))
    again = list(batches(10, 3, torch.Generator().manual_seed(0)))
    assert first == again and [len(b) for b in first] == [3, 3, 3, 1]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert first != [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    with pytest.raises(ValueError):
        next(batches(3, 0, rng=None))


def test_read_encode_collate_end_to_end(tok, tmp_path):
    from ppo_rlhf.data import read_sft

    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a b", "response": "c"}\n{"prompt": "d", "response": "e f"}\n')
    examples, _ = read_sft(path)
    encoded, _ = encode_sft(tok, examples, max_prompt_len=8, max_len=16)
    batch = collate_sft(encoded, pad_id=tok.pad_token_id)
    assert batch["input_ids"].tolist() == [[BOS, A, B, C, EOS], [BOS, D, E, F, EOS]]
    assert batch["loss_mask"].sum().item() == 2 + 3


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(
        st.lists(st.sampled_from("abcdef"), min_size=1, max_size=9), min_size=1, max_size=6
    ),
    responses=st.lists(
        st.lists(st.sampled_from("abcdef"), min_size=1, max_size=9), min_size=6, max_size=6
    ),
    max_prompt_len=st.integers(2, 8),
    extra=st.integers(-3, 8),
)
def test_encode_sft_invariants(prompts, responses, max_prompt_len, extra):
    tok = word_tokenizer()
    max_len = max(3, max_prompt_len + extra)
    examples = [
        sft(" ".join(p), " ".join(r), i) for i, (p, r) in enumerate(zip(prompts, responses))
    ]
    encoded, report = encode_sft(tok, examples, max_prompt_len, max_len)
    assert report.kept == len(encoded) and report.total == len(examples)
    expected_prompt_cuts = sum(len(p) + 1 > max_prompt_len for p in prompts)
    assert report.prompts_truncated == expected_prompt_cuts
    for e in encoded:
        example = examples[int(e.source.split(":")[1])]
        prompt_words, response_words = example.prompt.split(), example.response.split()
        words = [ID[w] for w in prompt_words]
        kept = words if len(words) < max_prompt_len else words[len(words) - max_prompt_len + 1 :]
        assert e.input_ids[: e.prompt_len] == [BOS] + kept
        assert len(e.input_ids) <= max_len
        response = [ID[w] for w in response_words] + [EOS]
        assert e.input_ids[e.prompt_len :] == response[: len(e.input_ids) - e.prompt_len]
        assert e.loss_mask == [False] * e.prompt_len + [True] * (len(e.input_ids) - e.prompt_len)


def test_check_token_ids_checks_every_record_and_names_it(tok):
    good = EncodedSFT([BOS, A, EOS], [False, True, True], 2, "sft.jsonl:1")
    bad = EncodedSFT([BOS, A, 40, EOS], [False, True, True, True], 2, "sft.jsonl:7")
    records = [good] * 50 + [bad] + [good]  # the bad id is far from the first record
    with pytest.raises(UserError, match=r"^sft\.jsonl:7: token id 40 is outside the model's vocabulary"):
        check_token_ids(records, vocab_size=15, source="sft.jsonl")
    check_token_ids([good] * 3, vocab_size=15, source="sft.jsonl")
    pairs = [EncodedPair([BOS, A, EOS], [BOS, B, EOS], 2, "prefs.jsonl:1"),
             EncodedPair([BOS, A, EOS], [BOS, -2, EOS], 2, "prefs.jsonl:2")]  # in the rejected side
    with pytest.raises(UserError, match=r"^prefs\.jsonl:2: token id -2"):
        check_token_ids(pairs, vocab_size=15, source="prefs.jsonl")
    # id lists and tensors carry no source: the record's number names it
    with pytest.raises(UserError, match=r"^prompts\.jsonl, record 3: token id 15 "):
        check_token_ids([[1, 2], [3], [4, 15]], vocab_size=15, source="prompts.jsonl")
    with pytest.raises(UserError, match=r"^prompts\.jsonl, record 2: token id 99 "):
        check_token_ids(torch.tensor([[1, 2], [3, 99]]), vocab_size=15, source="prompts.jsonl")


def test_encode_texts_adds_bos_and_eos_and_reports_cuts(tok):
    texts = [TextExample("a b c", "pt.jsonl:1"), TextExample("d e f a b", "pt.jsonl:2"), "c"]
    encoded, report = encode_texts(tok, texts, max_len=5, knobs="max_prompt_len + rollout.max_new_tokens")
    assert encoded == [[BOS, A, B, C, EOS], [BOS, D, E, F, A], [BOS, C, EOS]]
    assert (report.total, report.kept, report.texts_truncated) == (3, 3, 1)
    assert report.describe() == ("encoded 3 of 3 pretraining texts; 1 cut at 5 tokens (losing their "
                                 "eos) (raise max_prompt_len + rollout.max_new_tokens to keep more)")
    uncut, report = encode_texts(tok, texts, max_len=6)
    assert uncut[1] == [BOS, D, E, F, A, B] and report.texts_truncated == 1  # eos still cut
    assert encode_texts(tok, texts, max_len=7)[1].describe() == "encoded 3 of 3 pretraining texts"
    no_bos, _ = encode_texts(word_tokenizer(bos=False), ["a b"], max_len=8)
    assert no_bos == [[A, B, EOS]]
    with pytest.raises(UserError, match="max_len: .* must be at least 2"):
        encode_texts(tok, texts, max_len=1)
