"""Reward functions: loading, calling, validation, combination, process rewards on tokens."""

import math

import pytest
import torch
from tiny_tokenizer import make_tokenizer

from ppo_rlhf.errors import UserError
from ppo_rlhf.rewards import (
    FunctionScores,
    RewardFunctionError,
    RewardFunctions,
    combine_scores,
    load_reward_function,
    process_rewards_to_tokens,
    text_end_offsets,
)
from ppo_rlhf.tokenizer import train_tokenizer

USER_FILE = '''
def exact(prompts, responses, answer):
    return [1.0 if r.strip() == a else 0.0 for r, a in zip(responses, answer)]

def length(prompts, responses, **fields):
    return [float(len(r)) for r in responses]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return path


# ---- loading --------------------------------------------------------------------------------
def test_load_from_a_file_and_from_a_module(user_file):
    exact = load_reward_function(f"{user_file}:exact")
    assert exact(["q"], ["42"], answer=["42"]) == [1.0]
    gold = load_reward_function("ppo_rlhf.tasks.arithmetic:gold")
    assert callable(gold)


@pytest.mark.parametrize("spec, message", [
    ("no/such/file.py:fn", "no such file"),
    ("ppo_rlhf.no_such_module:fn", "no module named 'ppo_rlhf.no_such_module'"),
    ("{file}:missing", "has no attribute 'missing'; it defines: exact, length"),
    ("{file}:NOT_A_FUNCTION", "is a int, not a function"),
    ("just_a_name", "write it as `package.module:name`"),
])
def test_load_errors_name_the_spec_and_what_is_wrong(user_file, spec, message):
    spec = spec.format(file=user_file)
    with pytest.raises(UserError) as err:
        load_reward_function(spec)
    assert message in str(err.value)
    assert repr(spec) in str(err.value) or "just_a_name" in str(err.value)


def test_a_file_that_fails_to_import_is_named(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match=r"importing .*bad.py failed: RuntimeError: boom"):
        load_reward_function(f"{bad}:fn")


# ---- calling ----------------------------------------------------------------------------------
def test_functions_get_the_row_fields_they_name_and_weights_apply(user_file):
    fns = RewardFunctions([f"{user_file}:exact", f"{user_file}:length"], weights=[2.0, 0.5])
    assert fns.names == ["exact", "length"]
    fields = [{"answer": "4", "id": 7}, {"answer": "9", "id": 8}]
    out = fns.score(["2+2=", "3*3="], ["4", "10"], fields, row_ids=[0, 1])
    assert isinstance(out, FunctionScores)
    assert out.per_function["exact"].tolist() == [1.0, 0.0]
    assert out.per_function["length"].tolist() == [1.0, 2.0]
    # total = 2 * exact + 0.5 * length
    assert out.total.tolist() == [2.5, 1.0]
    assert out.steps == [[], []]


def test_python_callables_and_unique_names():
    def f(prompts, responses):
        return [1.0] * len(prompts)

    fns = RewardFunctions([f, f], weights=None)
    assert fns.names == ["f", "f_2"]
    out = fns.score(["a"], ["b"], [{}], [0])
    assert out.total.tolist() == [2.0]


def test_missing_fields_arrive_as_none():
    seen = {}

    def f(prompts, responses, **fields):
        seen.update(fields)
        return [0.0, 0.0]

    RewardFunctions([f]).score(["a", "b"], ["x", "y"], [{"answer": 1}, {}], [0, 1])
    assert seen == {"answer": [1, None]}


def test_weights_must_match_the_functions():
    with pytest.raises(UserError, match="reward.weights has 1 values but reward.functions has 2"):
        RewardFunctions([lambda p, r: [0.0], lambda p, r: [0.0]], weights=[1.0])


def test_a_raising_function_names_itself_and_the_failing_row():
    def picky(prompts, responses):
        return [1.0 / (len(r) - 3) for r in responses]  # ZeroDivisionError on 3-char responses

    fns = RewardFunctions([picky])
    with pytest.raises(RewardFunctionError) as err:
        fns.score(["p0", "p1", "p2"], ["a", "abc", "ab"], [{}, {}, {}], [10, 11, 12],
                  sources=["prompts.jsonl:11", "prompts.jsonl:12", "prompts.jsonl:13"])
    msg = str(err.value)
    assert "'picky' raised on row 11 (prompts.jsonl:12)" in msg
    assert "'abc'" in msg and "ZeroDivisionError" in msg


def test_wrong_length_is_an_error():
    fns = RewardFunctions([lambda prompts, responses: [1.0]])
    with pytest.raises(RewardFunctionError, match="returned 1 values for 2 responses"):
        fns.score(["a", "b"], ["x", "y"], [{}, {}], [0, 1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "1.0"])
def test_non_finite_or_non_number_is_an_error_naming_the_row(bad):
    fns = RewardFunctions([lambda prompts, responses: [0.5, bad]])
    with pytest.raises(RewardFunctionError) as err:
        fns.score(["a", "b"], ["x", "y"], [{}, {}], [4, 5])
    assert "'<lambda>'" in str(err.value) and "row 5" in str(err.value)


def test_bad_process_steps_are_errors():
    for steps, message in [([(1, float("nan"))], "non-finite reward"), ([(-1, 1.0)], "negative offset"),
                           ([(1.5, 1.0)], "char_offset: int"), ([1.0], "char_offset: int")]:
        fns = RewardFunctions([lambda prompts, responses, s=steps: [s]])
        with pytest.raises(RewardFunctionError, match=message):
            fns.score(["a"], ["xyz"], [{}], [0])


def test_process_rewards_are_weighted_steps_and_summed_per_function():
    def steps(prompts, responses):
        return [[(3, 1.0), (1, 0.5)], 2.0]  # the number in row 1 is one step at the end

    fns = RewardFunctions([steps, lambda prompts, responses: [1.0, 1.0]], weights=[2.0, 1.0])
    out = fns.score(["a", "b"], ["abcd", "xy"], [{}, {}], [0, 1])
    assert out.steps == [[(1, 1.0), (3, 2.0)], [(2, 4.0)]]  # sorted by offset, weighted
    assert out.per_function["steps"].tolist() == [1.5, 2.0]  # unweighted sums of the steps
    assert out.total.tolist() == [1.0, 1.0]  # only the non-process function


# ---- combining --------------------------------------------------------------------------------
def test_combine_sum_and_both_normalisations_by_hand():
    rm = torch.tensor([1.0, 2.0, 3.0])
    fn = torch.tensor([0.0, 0.0, 4.0])
    assert combine_scores([rm, fn], [1.0, 0.5], "sum").tolist() == [1.0, 2.0, 5.0]
    # sum = [1, 2, 5]: mean 8/3, biased var ((5/3)^2 + (2/3)^2 + (7/3)^2)/3 = 78/27
    s = torch.tensor([1.0, 2.0, 5.0])
    expected = (s - 8 / 3) / math.sqrt(78 / 27)
    torch.testing.assert_close(combine_scores([rm, fn], [1.0, 0.5], "sum_then_normalize"), expected)
    # rm standardised: [-1, 0, 1] * sqrt(3/2); fn: mean 4/3, var 32/9 -> [-1/sqrt2, -1/sqrt2, sqrt2]
    rm_n = torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5)
    fn_n = torch.tensor([-1 / math.sqrt(2), -1 / math.sqrt(2), math.sqrt(2)])
    torch.testing.assert_close(combine_scores([rm, fn], [1.0, 0.5], "normalize_then_sum"),
                               rm_n + 0.5 * fn_n, atol=1e-6, rtol=1e-6)


def test_combine_constant_component_normalises_to_zero_and_bad_mode_is_named():
    out = combine_scores([torch.full((4,), 3.0)], [1.0], "normalize_then_sum")
    assert out.abs().max() < 1e-3
    with pytest.raises(UserError, match="reward.combine: 'mean'"):
        combine_scores([torch.ones(2)], [1.0], "mean")


# ---- process rewards on tokens ------------------------------------------------------------------
def test_process_rewards_land_on_the_token_that_reaches_the_offset():
    tok = make_tokenizer()  # word level: "w1 w2 w3" decodes with single spaces
    w = tok.convert_tokens_to_ids
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = torch.tensor([[w("w1"), w("w2"), w("w3"), eos, pad],
                        [w("w4"), w("w5"), pad, pad, pad]])
    mask = ids != pad
    # row 0 text "w1 w2 w3": token ends at 2, 5, 8; EOS at position 3
    assert text_end_offsets(tok, [w("w1"), w("w2"), w("w3")]) == [2, 5, 8]
    steps = [[(0, 0.1), (2, 1.0), (3, 2.0), (8, 3.0), (50, 4.0)],  # 3 is inside "w2": token 1
             [(4, 5.0), (5, 6.0)]]  # row 1 "w4 w5" (no EOS: truncated): 5 is beyond -> last real
    out = process_rewards_to_tokens(tok, ids, mask, steps)
    expected = torch.tensor([[1.1, 2.0, 3.0, 4.0, 0.0],
                             [0.0, 5.0 + 6.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)


def test_process_rewards_with_byte_level_bpe_match_the_decoded_text():
    tok = train_tokenizer(["12+34=46", "the cat sat on the mat", "naïve café"] * 20, vocab_size=300)
    text = "the cat: café 12"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ends = text_end_offsets(tok, ids[:-1])
    assert ends[-1] == len(text) and ends == sorted(ends)
    # a step per word boundary, placed on the token that completes the word
    offsets = [i for i, c in enumerate(text) if c == " "] + [len(text)]
    out = process_rewards_to_tokens(tok, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool),
                                    [[(c, 1.0) for c in offsets]])
    for c in offsets:
        k = next(k for k, e in enumerate(ends) if e >= c)
        decoded = tok.decode(ids[:k + 1], skip_special_tokens=True)
        assert len(decoded) >= c and len(tok.decode(ids[:k], skip_special_tokens=True)) < c
    assert out.sum().item() == pytest.approx(len(offsets))
    assert out[0, -1] == 0  # nothing on EOS: every offset is within the text


# ---- row fields from a prompts file ------------------------------------------------------------
def test_prompt_rows_keep_their_other_keys_and_reach_the_functions(tmp_path):
    from ppo_rlhf.data.jsonl import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Q: 40+2=", "answer": "42", "level": 1}\n'
                    '{"prompt": "Q: 1+1=", "answer": "2"}\n'
                    '{"prompt": "Q: 1+1=", "answer": "3"}\n')
    examples, report = read_prompts(path)
    assert [e.fields for e in examples] == [{"answer": "42", "level": 1}, {"answer": "2"},
                                            {"answer": "3"}]
    assert report.duplicates == 0  # same prompt, different answer: not a duplicate

    def exact(prompts, responses, answer):
        return [float(r.strip() == a) for r, a in zip(responses, answer)]

    out = RewardFunctions([exact]).score([e.prompt for e in examples], [" 42", "2", "2"],
                                         [e.fields for e in examples], [0, 1, 2])
    assert out.total.tolist() == [1.0, 1.0, 0.0]
