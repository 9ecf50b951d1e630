"""ReplayBuffer: whole groups, mixed widths, size and staleness bounds, deterministic sampling,
exact resume from state_dict, per-rank shards; replay_plan's update counts."""

import io
from typing import NamedTuple

import pytest
import torch

from ppo_rlhf.replay import RESPONSE_FIELDS, SEQUENCE_FIELDS, ReplayBuffer, merge_shards, replay_plan
from ppo_rlhf.rollout import Experience

PAD = 0


class Row(NamedTuple):
    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    response_mask: torch.Tensor  # (B, R)
    logprobs: torch.Tensor  # (B, R)
    rewards: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,)
    function_scores: torch.Tensor  # (B, 2): a per-row field that is not response-aligned
    groups: torch.Tensor  # (B,)


def rollout(seed: int, n_prompts: int, n: int, P: int, R: int) -> Row:
    """n rows per prompt; prompt i has P - i % 2 real tokens (left padding) and row j R - j % R real
    response tokens (right padding); padding holds NaN / pad ids as in the trainer."""
    g = torch.Generator().manual_seed(seed)
    B = n_prompts * n
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    for b in range(B):
        prompt_mask[b, : (b // n) % 2] = False
    lengths = R - torch.arange(B) % R
    response_mask = torch.arange(R)[None, :] < lengths[:, None]
    seq = torch.randint(4, 40, (B, P + R), generator=g)
    mask = torch.cat([prompt_mask, response_mask], 1)
    seq = torch.where(mask, seq, PAD)
    logprobs = torch.where(response_mask, -torch.rand(B, R, generator=g), float("nan"))
    return Row(seq, mask, response_mask, logprobs, torch.randn(B, R, generator=g) * response_mask,
               torch.randn(B, generator=g), torch.randn(B, 2, generator=g),
               torch.arange(n_prompts).repeat_interleave(n))


def buffer(capacity=100, staleness=None, **kw) -> ReplayBuffer:
    return ReplayBuffer(capacity, staleness, pad_id=PAD, row_type=Row, **kw)


def real_rows(r: Row) -> list[tuple]:
    """Each row's content without its padding: prompt tokens, response tokens, response fields."""
    R = r.response_mask.size(1)
    out = []
    for b in range(r.sequences.size(0)):
        m = r.attention_mask[b]
        resp = r.response_mask[b]
        out.append((r.sequences[b][m].tolist(), int(m[:-R].sum()), r.logprobs[b][resp].tolist(),
                    r.rewards[b][resp].tolist(), float(r.scores[b]), r.function_scores[b].tolist()))
    return out


def test_rows_of_different_widths_concatenate_and_keep_their_content():
    a, b = rollout(0, 2, 2, P=3, R=4), rollout(1, 2, 2, P=5, R=2)
    buf = buffer()
    buf.add(a, version=0)
    buf.add(b, version=1)
    got = buf.sample(4, torch.Generator().manual_seed(0)).rows
    assert got.sequences.shape == (8, 5 + 4) and got.response_mask.shape == (8, 4)
    # left padding in the prompt part, right padding in the response part
    assert got.attention_mask[:, :5].long().diff(dim=1).ge(0).all()
    assert got.response_mask.long().diff(dim=1).le(0).all()
    assert (got.sequences[~got.attention_mask] == PAD).all()
    assert real_rows(got) == real_rows(a) + real_rows(b)


def test_a_sample_of_narrow_rows_is_trimmed_back_to_their_widths():
    a, b = rollout(0, 2, 2, P=3, R=4), rollout(1, 2, 2, P=5, R=2)
    buf = buffer(capacity=100, staleness=0)
    buf.add(b, version=0)
    buf.add(a, version=1)
    assert buf.evict_stale(current_version=1) == 4  # b's rows are one version behind
    got = buf.sample(2, torch.Generator().manual_seed(0)).rows
    for x, y in zip(got, a._replace(groups=torch.tensor([2, 2, 3, 3]))):
        assert torch.equal(x, y) or torch.allclose(x, y, equal_nan=True)


def test_groups_stay_together_and_get_unique_keys_across_rollouts():
    buf = buffer()
    for it in range(3):  # every rollout numbers its groups 0, 1, 2
        buf.add(rollout(it, 3, 2, P=2, R=3), version=it)
    assert len(buf) == 18 and buf.num_groups == 9
    s = buf.sample(4, torch.Generator().manual_seed(3))
    groups = s.rows.groups
    assert groups.unique().numel() == 4
    assert (groups.view(4, 2)[:, 0] == groups.view(4, 2)[:, 1]).all()  # a group's two rows, adjacent
    assert torch.equal(s.versions, groups // 3)  # keys 0-2 came from version 0, 3-5 from 1, ...


def test_capacity_evicts_the_oldest_whole_groups():
    buf = buffer(capacity=7)
    buf.add(rollout(0, 2, 3, P=2, R=3), version=0)  # groups 0, 1 (3 rows each)
    buf.add(rollout(1, 2, 3, P=2, R=3), version=1)  # groups 2, 3
    # 12 rows > 7: evicting groups 0 and 1 leaves 6 (evicting only group 0 would leave 9)
    assert len(buf) == 6
    assert buf.sample(2, torch.Generator()).rows.groups.unique().tolist() == [2, 3]


def test_staleness_drops_rows_more_than_max_versions_behind():
    buf = buffer(staleness=1)
    for v in range(4):
        buf.add(rollout(v, 1, 2, P=2, R=2), version=v)
    assert buf.evict_stale(current_version=4) == 6  # versions 0, 1, 2 are 4, 3, 2 behind
    assert buf.sample(1, torch.Generator()).versions.tolist() == [3, 3]
    assert buf.evict_stale(current_version=4) == 0


def test_sampling_is_a_function_of_the_generator():
    buf = buffer()
    for it in range(3):
        buf.add(rollout(it, 4, 2, P=3, R=3), version=it)
    draws = [buf.sample(3, torch.Generator().manual_seed(7)).index for _ in range(2)]
    assert torch.equal(*draws)
    g = torch.Generator().manual_seed(7)
    first, second = buf.sample(3, g).index, buf.sample(3, g).index
    assert not torch.equal(first, second)


def test_resume_from_state_dict_is_exact():
    def run(resume_after: int | None):
        buf, g = buffer(capacity=10, staleness=2), torch.Generator().manual_seed(5)
        draws = []
        for it in range(6):
            if it == resume_after:  # through bytes and weights_only loading, like the checkpoint
                blob = io.BytesIO()
                torch.save({"replay": buf.state_dict(), "gen": g.get_state()}, blob)
                blob.seek(0)
                saved = torch.load(blob, weights_only=True)
                buf, g = buffer(capacity=10, staleness=2), torch.Generator()
                buf.load_state_dict(saved["replay"])
                g.set_state(saved["gen"])
            buf.add(rollout(it, 3, 2, P=2 + it % 3, R=2 + it % 2), version=it)
            buf.evict_stale(it)
            draws.append(buf.sample(2, g))
        return draws

    for a, b in zip(run(None), run(3)):
        assert torch.equal(a.index, b.index) and torch.equal(a.versions, b.versions)
        for x, y in zip(a.rows, b.rows):
            assert torch.allclose(x, y, equal_nan=True) and x.shape == y.shape


def test_shards_partition_the_rows_and_merge_back_at_any_world_size():
    batches = [rollout(it, 4, 2, P=2 + it, R=3) for it in range(3)]
    whole = buffer(capacity=24)
    shards = [buffer(capacity=12, rank=r, world_size=2) for r in range(2)]
    for it, b in enumerate(batches):
        whole.add(b, version=it)
        assert sum(s.add(b, version=it) for s in shards) == 8
    assert [len(s) for s in shards] == [12, 12]
    everything = torch.Generator()
    keys = [set(s.sample(s.num_groups, everything).rows.groups.tolist()) for s in shards]
    assert keys == [set(range(0, 12, 2)), set(range(1, 12, 2))]

    merged = merge_shards([s.state_dict() for s in shards], pad_id=PAD)
    for name, t in whole.state_dict()["columns"].items():
        assert torch.allclose(merged["columns"][name], t, equal_nan=True), name
    assert torch.equal(merged["key"], whole.state_dict()["key"]) and merged["next_key"] == 12

    for r, original in enumerate(shards):  # resume at the same world size: each rank's own shard
        again = buffer(capacity=12, rank=r, world_size=2)
        again.load_state_dict(merged)
        assert torch.equal(again.state_dict()["key"], original.state_dict()["key"])
    three = [buffer(capacity=12, rank=r, world_size=3) for r in range(3)]  # or at another one
    for s in three:
        s.load_state_dict(merged)
    assert sorted(k for s in three for k in s.state_dict()["key"].tolist()) == whole.state_dict()["key"].tolist()


def test_the_trainers_experience_rows_round_trip():
    def experience(seed, P, R):
        g = torch.Generator().manual_seed(seed)
        B = 4
        lengths = torch.tensor([R, R - 1, 1, R])
        response_mask = torch.arange(R)[None, :] < lengths[:, None]
        attention_mask = torch.cat([torch.ones(B, P, dtype=torch.bool), response_mask], 1)
        fields = {}
        for name in Experience._fields:
            if name in SEQUENCE_FIELDS:
                fields[name] = attention_mask.clone() if name == "attention_mask" else torch.where(
                    attention_mask, torch.randint(4, 40, (B, P + R), generator=g), PAD)
            elif name in RESPONSE_FIELDS:
                fields[name] = response_mask.clone() if name.endswith("mask") else torch.randn(B, R, generator=g)
            elif name == "groups":
                fields[name] = torch.tensor([0, 0, 1, 1])
            elif name == "truncated":
                fields[name] = torch.tensor([False, False, True, False])
            elif name == "function_scores":
                fields[name] = torch.randn(B, 2, generator=g)
            else:
                fields[name] = torch.randn(B, generator=g)
        return Experience(**fields)

    a, b = experience(0, 3, 4), experience(1, 5, 2)
    buf = ReplayBuffer(100, pad_id=PAD, row_type=Experience)
    buf.add(a, version=0)
    buf.add(b, version=1)
    got = buf.sample(4, torch.Generator()).rows
    assert isinstance(got, Experience) and got.prompt_len == 5 and got.response_mask.size(1) == 4
    first = Experience(*(t[:4] for t in got))
    for name, x, y in zip(Experience._fields, first, a):
        if name in SEQUENCE_FIELDS:
            x = x[:, 2:]  # a's rows padded by two prompt columns on the left
        if name != "groups":
            assert torch.equal(x, y), name


def test_misuse_is_reported():
    with pytest.raises(ValueError, match="does not fit"):
        buffer(capacity=3).add(rollout(0, 1, 4, P=2, R=2), version=0)
    buf = buffer()
    buf.add(rollout(0, 2, 2, P=2, R=3), version=0)
    with pytest.raises(ValueError, match="cannot sample 3 groups"):
        buf.sample(3, torch.Generator())
    wide = rollout(1, 2, 2, P=2, R=3)
    wide = wide._replace(function_scores=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="function_scores"):
        buf.add(wide, version=1)
    with pytest.raises(ValueError, match="need the fields groups"):
        buf.add({"sequences": wide.sequences, "response_mask": wide.response_mask}, version=1)


def test_replay_plan_spreads_fractional_updates_exactly():
    # 0.25 updates per new row, 10 new rows: 2.5 per iteration
    assert [replay_plan(k, 10, 0.25, 4).updates for k in range(4)] == [2, 3, 2, 3]
    assert replay_plan(1, 10, 0.25, 4).rows == 12
    # 0.3 * 10 is 2.9999999999999996 in floats: still 3 updates every iteration
    assert [replay_plan(k, 10, 0.3, 4).updates for k in range(5)] == [3] * 5
    # PPO: 4 epochs x 4 minibatches over 64 rows is rho = 16 / 64
    assert replay_plan(0, 64, 16 / 64, 16) == (16, 256)
    with pytest.raises(ValueError):
        replay_plan(0, 10, -1.0, 4)
