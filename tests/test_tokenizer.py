"""Tokenizer: byte-level BPE training, exact round trip, special tokens, save/load."""

import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ppo_rlhf.errors import UserError
from ppo_rlhf.tasks import get_task
from ppo_rlhf.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    tokenizer_summary,
    train_tokenizer,
)


@pytest.fixture(scope="module", params=["arithmetic", "sentiment"])
def task_and_tokenizer(request):
    task = get_task(request.param)
    corpus = task.tokenizer_corpus(random.Random(0))
    return task, train_tokenizer(corpus, vocab_size=task.default_vocab_size)


def _task_texts(task, n=200):
    rng = random.Random(1)
    texts = task.pretrain_texts(20, rng)
    for prompt in task.sample_prompts(n, rng):
        texts += [prompt, task.demonstration(prompt, rng), task.candidate(prompt, rng)]
    return texts


def test_round_trip_is_exact(task_and_tokenizer):
    task, tok = task_and_tokenizer
    extra = ["  two leading spaces", " trailing space ", "tab\tand\nnewline", "héllo ✓ 😀", " -12"]
    for text in _task_texts(task) + extra:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids) & {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}


def test_digits_are_single_tokens(task_and_tokenizer):
    _, tok = task_and_tokenizer
    assert tok.convert_ids_to_tokens(tok.encode(" 1234")) == ["Ġ", "1", "2", "3", "4"]
    assert tok.convert_ids_to_tokens(tok.encode("Q: 7+12=")) == [
        "Q",
        ":",
        "Ġ",
        "7",
        "+",
        "1",
        "2",
        "=",
    ]


def test_special_tokens_are_distinct(task_and_tokenizer):
    _, tok = task_and_tokenizer
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == tuple(SPECIAL_TOKENS.values())
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.padding_side == "right" and tok.model_max_length == 1024
    summary = tokenizer_summary(tok)
    assert summary["vocab_size"] == len(tok)
    assert (summary["pad_token_id"], summary["eos_token_id"], summary["bos_token_id"]) == (0, 1, 2)


def test_default_budgets_fit_the_task(task_and_tokenizer):
    """Prompts fit default_max_prompt_len; correct responses plus EOS fit default_max_new_tokens."""
    task, tok = task_and_tokenizer
    assert max(len(tok.encode(p)) for p in task.all_prompts()) <= task.default_max_prompt_len
    rng = random.Random(0)
    good = task.__class__(demo_error_rate=0.0)
    for prompt in task.sample_prompts(300, rng):
        assert len(tok.encode(good.demonstration(prompt, rng))) + 1 <= task.default_max_new_tokens


def test_sentiment_words_are_whole_tokens():
    task = get_task("sentiment")
    tok = train_tokenizer(task.tokenizer_corpus(random.Random(0)), task.default_vocab_size)
    assert tok.convert_ids_to_tokens(tok.encode(" the staff were delicious.")) == [
        "Ġthe",
        "Ġstaff",
        "Ġwere",
        "Ġdelicious",
        ".",
    ]


def test_training_is_deterministic():
    corpus = get_task("sentiment").tokenizer_corpus(random.Random(0))
    assert train_tokenizer(corpus, 600).get_vocab() == train_tokenizer(corpus, 600).get_vocab()


def test_save_and_reload(tmp_path, task_and_tokenizer):
    task, tok = task_and_tokenizer
    out = tmp_path / "tok"
    save_tokenizer(tok, out)
    for loaded in (AutoTokenizer.from_pretrained(out), load_tokenizer(out)):
        assert tokenizer_summary(loaded) == tokenizer_summary(tok)
        for text in _task_texts(task, 30):
            assert loaded.encode(text) == tok.encode(text)
            assert loaded.decode(loaded.encode(text)) == text


def test_train_with_out_dir_saves(tmp_path):
    out = tmp_path / "tok"
    tok = train_tokenizer(["Q: 1+2= 3"], out_dir=out)
    assert load_tokenizer(out).get_vocab() == tok.get_vocab()
    with pytest.raises(UserError, match="vocab_size=100"):
        train_tokenizer(["x"], vocab_size=100)


def test_load_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'missing'}.*ppo-rlhf tokenizer --task"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no tokenizer.*ppo-rlhf tokenizer --task"):
        load_tokenizer(tmp_path / "empty")


def _variant(tmp_path, name, **special_tokens):
    """A trained tokenizer re-wrapped with other special tokens, saved to tmp_path / name."""
    base = train_tokenizer(["Q: 1+2= 3"])
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, **special_tokens)
    tok.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_load_rejects_pad_equal_to_eos(tmp_path):
    path = _variant(tmp_path, "same", pad_token="<|eos|>", eos_token="<|eos|>")
    with pytest.raises(UserError, match="also the EOS token.*distinct pad token"):
        load_tokenizer(path)


def test_load_adds_a_distinct_pad_with_a_warning(tmp_path):
    path = _variant(tmp_path, "nopad", eos_token="<|eos|>")
    with pytest.warns(UserWarning, match="no pad token"):
        tok = load_tokenizer(path)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id


def test_load_requires_eos(tmp_path):
    path = _variant(tmp_path, "noeos")
    with pytest.raises(UserError, match="no EOS token"):
        load_tokenizer(path)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
def test_a_saved_tokenizer_reloads_as_saved_beside_any_model_config(tmp_path, task_and_tokenizer, model_type):
    """Beside a model's config.json, AutoTokenizer would take the tokenizer class of the model type
    (qwen2: Qwen2Tokenizer, which adds `<|endoftext|>`): ours reloads with its own vocabulary."""
    _task, tok = task_and_tokenizer
    out = tmp_path / "model"
    save_tokenizer(tok, out)
    (out / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    loaded = load_tokenizer(out)
    assert loaded.get_vocab() == tok.get_vocab() and len(loaded) == len(tok)
    assert tokenizer_summary(loaded) == tokenizer_summary(tok)
