"""SFT stage pieces: the response-token loss against a plain loop, the padded training set, length
bucketing, and the end-of-stage evaluation (greedy and sampled gold reward)."""

import json
import math

import pytest
import torch
from tiny_tokenizer import make_tokenizer

from ppo_rlhf.data.collate import collate_sft, padded_sft
from ppo_rlhf.data.encode import EncodedSFT
from ppo_rlhf.models import load_causal_lm
from ppo_rlhf.stages import common, sft


def examples(lengths_and_prompts):
    """EncodedSFT rows with ids 4.. and the loss on the tokens after the prompt."""
    out = []
    for k, (length, prompt) in enumerate(lengths_and_prompts):
        ids = [4 + (7 * k + 3 * t) % 40 for t in range(length)]
        out.append(EncodedSFT(ids, [t >= prompt for t in range(length)], prompt, f"row {k}"))
    return out


@pytest.fixture(scope="module")
def model():
    return load_causal_lm("tiny-gpt2", make_tokenizer(), seed=0).eval()


def plain_loop_loss(model, batch):
    """Sum over rows b and positions t with loss_mask[b, t+1] of -log p(ids[b, t+1] | ids[b, :t+1])."""
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    total, count = 0.0, 0
    for b in range(ids.size(0)):
        n = int(mask[b].sum())
        logits = model(input_ids=ids[b:b + 1, :n]).logits[0].double()  # unpadded row, positions 0..n-1
        for t in range(n - 1):
            if loss_mask[b, t + 1]:
                total -= torch.log_softmax(logits[t], -1)[ids[b, t + 1]].item()
                count += 1
    return total, count


def test_token_losses_sum_the_response_tokens_of_each_row_as_a_plain_loop_does(model, monkeypatch):
    batch = collate_sft(examples([(9, 4), (5, 2), (12, 9), (7, 6)]), pad_id=0)
    want, count = plain_loop_loss(model, batch)
    with torch.no_grad():
        s, n = sft.token_losses(model, batch)
    assert int(n) == count == (9 - 4) + (5 - 2) + (12 - 9) + (7 - 6)
    assert s.item() == pytest.approx(want, rel=1e-5)
    # the same without logits_to_keep (a model whose forward lacks it): full logits, then the positions
    monkeypatch.setattr(sft, "_takes_logits_to_keep", lambda m: False)
    with torch.no_grad():
        s2, n2 = sft.token_losses(model, batch)
    assert int(n2) == count and s2.item() == pytest.approx(want, rel=1e-5)


def test_padded_set_batches_equal_the_collate_function():
    rows = examples([(9, 4), (5, 2), (12, 9), (7, 6), (3, 1)])
    padded = padded_sft(rows, pad_id=0)
    assert len(padded) == 5 and padded.lengths.tolist() == [9, 5, 12, 7, 3]
    for pick in ([1, 4], [3, 0, 2], [2]):
        got, want = padded.batch(pick), collate_sft([rows[i] for i in pick], pad_id=0)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_bucketed_batches_keep_each_pool_of_examples_and_cut_it_by_length():
    lengths = torch.tensor([(7 * i) % 13 + 3 for i in range(50)])
    bs, pool, seed = 4, 3, 5
    for first in range(0, 12, pool):
        plain = [common.global_batch(50, bs, seed, s) for s in range(first, first + pool)]
        bucketed = [common.bucketed_batch(lengths, bs, seed, s, pool) for s in range(first, first + pool)]
        assert sorted(sum(bucketed, [])) == sorted(sum(plain, []))  # the same examples, each once
        # batches are consecutive slices of the pool sorted by length
        spans = sorted((lengths[b].min().item(), lengths[b].max().item()) for b in bucketed)
        assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))
        def padding(bs_):
            return sum(len(b) * lengths[b].max().item() - lengths[b].sum().item() for b in bs_)
        assert padding(bucketed) <= padding(plain)
    # a pure function of the step: asking again, or out of order, gives the same batch
    assert common.bucketed_batch(lengths, bs, seed, 7, pool) == common.bucketed_batch(lengths, bs, seed, 7, pool)
    assert [common.bucketed_batch(lengths, bs, seed, s, 1) for s in range(5)] == \
        [common.global_batch(50, bs, seed, s) for s in range(5)]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from ppo_rlhf.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("sft")
    qs = [(a, b) for a in range(6) for b in range(6)]
    (root / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"Q: {a}+{b}=", "response": f" {a + b}"}) + "\n"
                                            for a, b in qs))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Q: {a}+{b}="}) + "\n" for a, b in qs[:8]))
    train_tokenizer([f"Q: {a}+{b}= {a + b}" for a, b in qs], 300, root / "tok")
    return root


def test_sft_reports_the_gold_reward_of_greedy_and_of_sampled_responses(tiny_data, tmp_path, monkeypatch):
    """Issue 13 defect 8: the doc says greedy, the code sampled at 0.7; now both are reported."""
    from ppo_rlhf.config import SFTConfig, build_config

    temperatures = []
    evaluate_policy = sft.evaluate_policy

    def recording(*args, **kwargs):
        temperatures.append(kwargs["temperature"])
        return evaluate_policy(*args, **kwargs)

    monkeypatch.setattr(sft, "evaluate_policy", recording)
    cfg = build_config(SFTConfig, overrides=[
        f"out_dir={tmp_path}", f"train_file={tiny_data / 'sft.jsonl'}", f"model.tokenizer={tiny_data / 'tok'}",
        "model.path=tiny-gpt2", "max_steps=2", "batch_size=4", "task=arithmetic",
        f"eval_prompts_file={tiny_data / 'prompts.jsonl'}", "eval_temperature=0.9", "run.tensorboard=false"])
    summary = sft.run_sft(cfg)
    assert sorted(temperatures) == [0.0, 0.9]
    for key in ("gold_reward", "gold_reward_std", "gold_reward_greedy", "gold_reward_greedy_std"):
        assert math.isfinite(summary[key]), key
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["sft/gold_reward"] == summary["gold_reward"]
    assert last["sft/gold_reward_greedy"] == summary["gold_reward_greedy"]
