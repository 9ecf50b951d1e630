"""Test-wide fixtures.

One torch thread for every test: tiny models are overhead-bound, and with two threads on a shared
2-core machine every small op waits for the other core whenever another process holds it
(seconds per test instead of milliseconds). A test that changes the thread count (a stage's
run.threads) gets it put back.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def arithmetic_models(tmp_path_factory):
    """Built once per session for the tests that need an RL-ready set: the arithmetic task's
    tokenizer (320 tokens, trained on its corpus), a random tiny-gpt2 "SFT" policy in root/"sft" and
    a reward model initialised from it (random head) in root/"rm", each saved with the tokenizer.
    Read-only: a test that needs its own files puts them in its own directory (a symlink to these
    models is enough)."""
    import random

    from ppo_rlhf.models import load_causal_lm, load_scalar_model, save_model
    from ppo_rlhf.tasks import get_task
    from ppo_rlhf.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("arithmetic_models")
    tok = train_tokenizer(get_task("arithmetic").tokenizer_corpus(random.Random(0)), 320)
    save_model(load_causal_lm("tiny-gpt2", tok, seed=0), tok, root / "sft")
    rm = load_scalar_model(str(root / "sft"), tok, init_from_causal_lm=True, head_init_std=0.02, seed=1)
    save_model(rm, tok, root / "rm")
    return root
