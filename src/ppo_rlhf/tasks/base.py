"""The `Task` interface shared by the built-in tasks, the simulated labeller and the data writer.

A task is a small world in which the gold reward is known: it samples prompts, writes SFT
demonstrations (with a share of realistic mistakes, so that RL has something to fix), produces
policy-like candidate responses, and scores any response with a programmatic `gold_reward`. The
simulated labeller turns gold scores into Bradley-Terry-noisy preferences, the way a human
labeller's choices are noisy, so that the pipeline can show gold reward rising (or, once the
policy games the learned reward model, falling) while the proxy reward keeps going up.

Everything is deterministic given a `random.Random`; `write_task_data` derives one stream per
output file from the seed, so a file's content does not depend on which other files are written.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path

from ppo_rlhf.errors import UserError
from ppo_rlhf.fileio import atomic_write_json, atomic_write_text

SPLITS = ("train", "eval")


class Task(ABC):
    """A built-in task: prompt generator, demonstrations, candidates and a gold reward.

    Subclasses set the class attributes below and implement the abstract methods. Responses are
    the text that follows the prompt, without the EOS token.
    """

    name: str = ""
    """Registry name, e.g. "arithmetic"."""
    description: str = ""
    """One line for `--help` and reports."""
    default_max_new_tokens: int = 16
    """Generation budget (tokens) that fits a well-formed response with the default tokenizer."""
    default_max_prompt_len: int = 16
    """Longest prompt (tokens) with the default tokenizer, with some headroom."""
    default_vocab_size: int = 512
    """BPE vocabulary size for `ppo-rlhf tokenizer --task NAME` when none is given."""
    default_noise_temperature: float = 0.1
    """Labeller noise on the scale of this task's gold reward (see `label_pair`)."""
    eval_fraction: float = 0.2
    """Share of the prompt space held out for evaluation (decided per prompt by a stable hash)."""

    def __init__(self, demo_error_rate: float = 0.35):
        if not 0.0 <= demo_error_rate <= 1.0:
            raise UserError(
                f"demo_error_rate={demo_error_rate} is not a fraction; fix: use a value in [0, 1]"
            )
        self.demo_error_rate = demo_error_rate

    # ---- what each task implements -------------------------------------------------------
    @abstractmethod
    def all_prompts(self) -> list[str]:
        """Every prompt this task can ask, in a fixed order (the prompt spaces are small)."""

    @abstractmethod
    def demonstration(self, prompt: str, rng: random.Random) -> str:
        """An SFT demonstration for `prompt`; a `demo_error_rate` share of them is flawed."""

    @abstractmethod
    def candidate(self, prompt: str, rng: random.Random) -> str:
        """A response as a policy might produce it: a mix of good and variously flawed ones."""

    @abstractmethod
    def gold_reward(self, prompt: str, response: str, *, truncated: bool = False) -> float:
        """The programmatic gold score of `response` (decoded text without EOS) to `prompt`.

        `truncated` says that generation stopped without EOS; the built-in tasks score the text
        alone and leave the missing-EOS penalty to the PPO reward.
        """

    def gold_rewards(self, prompts: list[str], responses: list[str], truncated: list[bool] | None = None,
                     fields: list[dict] | None = None) -> list[float]:
        """`gold_reward` of each (prompt, response). `fields` are the prompt rows' other JSONL keys:
        a subclass's gold_reward receives those it names (the built-in tasks name none, their
        prompts say everything)."""
        from ppo_rlhf.rewards import _accepted_fields

        n = len(prompts)
        truncated = truncated or [False] * n
        fields = fields or [{}] * n
        accepts = _accepted_fields(self.gold_reward)
        return [self.gold_reward(p, r, truncated=t, **{k: v for k, v in f.items()
                                                      if (accepts is None or k in accepts) and k != "truncated"})
                for p, r, t, f in zip(prompts, responses, truncated, fields)]

    @abstractmethod
    def pretrain_texts(self, n: int, rng: random.Random) -> list[str]:
        """`n` correct, well-formed texts of the task's domain for the PPO-ptx LM loss."""

    @abstractmethod
    def tokenizer_corpus(self, rng: random.Random) -> list[str]:
        """Texts to train the tokenizer on, covering every character the task can produce."""

    # ---- prompts and splits ----------------------------------------------------------------
    def prompt_split(self, prompt: str) -> str:
        """ "eval" for the held-out share of the prompt space, else "train".

        A stable hash of the text decides, so the split is a property of the prompt: the same in
        every run, for every seed and for every file.
        """
        bucket = zlib.crc32(prompt.encode("utf-8")) % 10_000
        return "eval" if bucket < self.eval_fraction * 10_000 else "train"

    @cached_property
    def _prompts_by_split(self) -> dict[str, list[str]]:
        by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
        for prompt in self.all_prompts():
            by_split[self.prompt_split(prompt)].append(prompt)
        return by_split

    def prompts(self, split: str = "train") -> list[str]:
        """All prompts of one split ("train", "eval", or "all" for both), in a fixed order."""
        if split == "all":
            return self.all_prompts()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or 'all', got {split!r}")
        return self._prompts_by_split[split]

    def sample_prompts(self, n: int, rng: random.Random, split: str = "train") -> list[str]:
        """`n` prompts drawn uniformly with replacement from one split (train by default)."""
        pool = self.prompts(split)
        return [rng.choice(pool) for _ in range(n)]

    def distinct_prompts(self, n: int, rng: random.Random, split: str = "train") -> list[str]:
        """Up to `n` different prompts of one split, in random order (fewer if it is small)."""
        pool = self.prompts(split)
        return rng.sample(pool, min(n, len(pool)))

    # ---- simulated labeller ------------------------------------------------------------------
    def label_pair(
        self, prompt: str, a: str, b: str, rng: random.Random, noise_temperature: float
    ) -> tuple[str, str] | None:
        """Label one pair like a noisy human: return (chosen, rejected), or None to skip it.

        Bradley-Terry noise: P(a preferred) = sigmoid((gold(a) - gold(b)) / noise_temperature).
        `noise_temperature=0` gives exact gold labels; then gold ties are skipped, as are pairs
        of identical text at any temperature.
        """
        if a == b:
            return None
        gold_a, gold_b = self.gold_reward(prompt, a), self.gold_reward(prompt, b)
        if noise_temperature == 0:
            if gold_a == gold_b:
                return None
            return (a, b) if gold_a > gold_b else (b, a)
        prefer_a = rng.random() < _sigmoid((gold_a - gold_b) / noise_temperature)
        return (a, b) if prefer_a else (b, a)

    def rank(
        self, prompt: str, responses: list[str], rng: random.Random, noise_temperature: float
    ) -> list[str]:
        """Order `responses` best to worst by noisy gold scores (a Plackett-Luce sample).

        Each score is gold/noise_temperature plus Gumbel noise, which makes every pair's order
        agree with `label_pair`'s Bradley-Terry probability; with temperature 0 the order is by
        gold, gold ties in random order.
        """
        golds = [self.gold_reward(prompt, r) for r in responses]
        if noise_temperature == 0:
            keys = [(g, rng.random()) for g in golds]
        else:
            keys = [(g / noise_temperature + _gumbel(rng), 0.0) for g in golds]
        order = sorted(range(len(responses)), key=lambda i: keys[i], reverse=True)
        return [responses[i] for i in order]

    def preference_pairs(
        self,
        n: int,
        rng: random.Random,
        noise_temperature: float,
        k: int = 2,
        split: str = "train",
        drop_ties: bool = True,
    ) -> list[dict]:
        """`n` labelled records on prompts of `split`, from `candidate` responses.

        k=2 gives {"prompt", "chosen", "rejected"}; k>2 gives rankings {"prompt", "responses"}
        ordered best to worst (the reward model trains on all C(k, 2) pairs). With `drop_ties`
        the labeller declines candidates of equal gold ("equally good"), as labellers may, so
        no record is a coin flip; a ranking needs at least two different gold scores.
        """
        if k < 2:
            raise UserError(f"k={k}: a preference record needs at least 2 responses; fix: k >= 2")
        records: list[dict] = []
        attempts = 0
        while len(records) < n:
            attempts += 1
            if attempts > 1000 + 100 * n:
                raise RuntimeError(
                    f"task {self.name!r}: could not build {n} preference records "
                    f"(got {len(records)}); its candidates are too uniform"
                )
            prompt = rng.choice(self.prompts(split))
            responses = self._distinct_candidates(prompt, k, rng)
            if responses is None:
                continue
            golds = {self.gold_reward(prompt, r) for r in responses}
            if k == 2:
                if drop_ties and len(golds) == 1:
                    continue
                labelled = self.label_pair(prompt, *responses, rng, noise_temperature)
                if labelled is not None:
                    chosen, rejected = labelled
                    records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            elif len(golds) > 1:
                ranked = self.rank(prompt, responses, rng, noise_temperature)
                records.append({"prompt": prompt, "responses": ranked})
        return records

    def _distinct_candidates(self, prompt: str, k: int, rng: random.Random) -> list[str] | None:
        responses: list[str] = []
        for _ in range(20 * k):
            response = self.candidate(prompt, rng)
            if response not in responses:
                responses.append(response)
                if len(responses) == k:
                    return responses
        return None

    def sft_records(self, n: int, rng: random.Random, split: str = "train") -> list[dict]:
        """`n` SFT records {"prompt", "response"} on prompts of `split`."""
        return [
            {"prompt": p, "response": self.demonstration(p, rng)}
            for p in self.sample_prompts(n, rng, split)
        ]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _gumbel(rng: random.Random) -> float:
    u = rng.random()
    while u == 0.0:
        u = rng.random()
    return -math.log(-math.log(u))


def write_task_data(
    task: Task,
    out_dir: str | Path,
    seed: int,
    n_sft: int = 2000,
    n_prefs: int = 2000,
    n_prompts: int = 1000,
    n_eval: int = 200,
    noise_temperature: float | None = None,
    k: int = 2,
    holdout: str = "problems",
) -> dict[str, Path]:
    """Write a task's datasets as JSONL files (plus task.json) into `out_dir`; return their paths.

    Files: sft_train / sft_eval ({"prompt", "response"}), prefs_train (labeller noise
    `noise_temperature`, default the task's; rankings if k > 2) / prefs_eval (exact gold labels,
    pairs), prompts_train / prompts_eval ({"prompt"}, distinct, so at most the split's size),
    pretrain ({"text"}, n_sft texts). Each file comes from its own seeded random stream and is
    written atomically.

    `holdout` says what the eval prompts are held out from: "problems" -- from every training
    file (SFT, preferences, PPO prompts: a test of generalisation to unseen prompts); "ppo" -- from
    the PPO prompts only, while SFT demonstrations and preferences cover the task's whole prompt
    space, as in InstructGPT where every stage draws from one distribution of user prompts.
    """
    if holdout not in ("problems", "ppo"):
        raise UserError(f"holdout={holdout!r}; fix: use 'problems' or 'ppo'")
    sft_split = "train" if holdout == "problems" else "all"
    if noise_temperature is None:
        noise_temperature = task.default_noise_temperature
    if noise_temperature < 0:
        raise UserError(
            f"noise_temperature={noise_temperature} is negative; fix: use 0 (exact labels) or more"
        )
    out_dir = Path(out_dir)

    def stream(kind: str) -> random.Random:
        return random.Random(f"{seed}/{task.name}/{kind}")

    datasets: dict[str, list[dict]] = {
        "sft_train": task.sft_records(n_sft, stream("sft_train"), sft_split),
        "sft_eval": task.sft_records(n_eval, stream("sft_eval"), "eval"),
        "prefs_train": task.preference_pairs(
            n_prefs, stream("prefs_train"), noise_temperature, k=k, split=sft_split
        ),
        "prefs_eval": task.preference_pairs(n_eval, stream("prefs_eval"), 0.0, split="eval"),
        "prompts_train": _prompt_records(task.distinct_prompts(n_prompts, stream("prompts_train"))),
        "prompts_eval": _prompt_records(
            task.distinct_prompts(n_eval, stream("prompts_eval"), "eval")
        ),
        "pretrain": [{"text": t} for t in task.pretrain_texts(n_sft, stream("pretrain"))],
    }
    paths: dict[str, Path] = {}
    for kind, records in datasets.items():
        paths[kind] = out_dir / f"{kind}.jsonl"
        atomic_write_text(paths[kind], "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_json(
        out_dir / "task.json",
        {
            "name": task.name,
            "seed": seed,
            "sizes": {kind: len(records) for kind, records in datasets.items()},
            "noise_temperature": noise_temperature,
            "k": k,
            "holdout": holdout,
            "demo_error_rate": task.demo_error_rate,
            "default_max_new_tokens": task.default_max_new_tokens,
            "default_max_prompt_len": task.default_max_prompt_len,
        },
    )
    return paths


def _prompt_records(prompts: list[str]) -> list[dict]:
    return [{"prompt": p} for p in prompts]
