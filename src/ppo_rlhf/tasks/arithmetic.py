"""Arithmetic: "Q: 7+12=" -> " 19". The gold reward is 1 for the exact answer, else 0.

Operands 0..19 with + and - give 800 prompts and answers -19..38, at most two digits and a sign:
with the tokenizer's one-token-per-digit split, a 2-layer transformer learns the table on CPU in
minutes; `max_operand` widens it. Gold is exact (no partial credit), so mean gold reward is accuracy.

The demonstrations are careless: 60% are flawed, mostly in form (text after the answer, the answer
written twice). SFT imitates that (sampled accuracy ~0.64 in the default pipeline); the reward
model learns from preferences to see such flaws far better than wrong numbers, so PPO mainly
removes them (to ~0.88). With beta = 0 the policy instead drifts to numbers the RM happens to like
and gold accuracy collapses while the RM score rises -- over-optimisation.
"""

from __future__ import annotations

import random
import re
from functools import cache

from ppo_rlhf.errors import UserError
from ppo_rlhf.tasks.base import Task

_PROMPT_RE = re.compile(r"Q: (\d+)([+-])(\d+)=")

# Text a policy may add after its answer; only characters that prompts and answers already use.
_TRAILING = [".", " .", "=", " =", " Q", "+1", " 0", "-"]

# Demonstration mistakes of a careless human writer; a policy produces the same and more. Most
# are sloppy form (text after the answer, the answer written twice) -- the kind of flaw a reward
# model learns to see from preferences, and so the kind PPO can remove; the rest are wrong numbers.
_DEMO_FLAWS = {
    "off_by_one": 0.08,
    "off_by_ten": 0.07,
    "swap_digits": 0.03,
    "trailing": 0.55,
    "repeat": 0.25,
    "wrong_operation": 0.02,
}
# Near misses (off by one) are rarer among candidates than in demonstrations: a 2-layer reward
# model judges them barely above chance (~55%), against ~99% for format errors and ~85% for gross
# ones, and these weights keep its held-out pairwise accuracy near 0.88.
_CANDIDATE_FLAWS = {
    "off_by_one": 0.1,
    "off_by_ten": 0.1,
    "swap_digits": 0.1,
    "trailing": 0.2,
    "wrong_operation": 0.1,
    "repeat": 0.1,
    "random": 0.2,
    "empty": 0.1,
}


class ArithmeticTask(Task):
    """Addition and subtraction of two small non-negative integers; exact-answer gold reward."""

    name = "arithmetic"
    description = "Q: a+b= / Q: a-b= with operands 0..19; gold 1 for the exact answer, else 0"
    default_max_new_tokens = 6
    default_max_prompt_len = 12
    default_vocab_size = 512
    default_noise_temperature = 0.5
    """Gold steps are 0/1: a labeller picks the correct answer w.p. sigmoid(2) = 0.88."""

    def __init__(
        self,
        demo_error_rate: float = 0.6,
        max_operand: int = 19,
        candidate_correct_rate: float = 0.5,
    ):
        super().__init__(demo_error_rate)
        if max_operand < 1:
            raise UserError(f"max_operand={max_operand}; fix: use an integer >= 1")
        self.max_operand = max_operand
        self.candidate_correct_rate = candidate_correct_rate

    def all_prompts(self) -> list[str]:
        return [
            f"Q: {a}{op}{b}="
            for op in "+-"
            for a in range(self.max_operand + 1)
            for b in range(self.max_operand + 1)
        ]

    def answer(self, prompt: str) -> int:
        """The exact integer answer to an arithmetic prompt."""
        match = _PROMPT_RE.fullmatch(prompt)
        if match is None:
            raise UserError(
                f"prompt {prompt!r} is not an arithmetic prompt like 'Q: 7+12='; "
                "fix: score only prompts of the arithmetic task with its gold reward"
            )
        a, op, b = int(match[1]), match[2], int(match[3])
        return a + b if op == "+" else a - b

    def gold_reward(self, prompt: str, response: str, *, truncated: bool = False) -> float:
        """1.0 if `response` is the exact answer (leading spaces allowed, nothing after it)."""
        return 1.0 if response.lstrip() == str(self.answer(prompt)) else 0.0

    def demonstration(self, prompt: str, rng: random.Random) -> str:
        if rng.random() < self.demo_error_rate:
            return self._flawed(prompt, _pick(_DEMO_FLAWS, rng), rng)
        return f" {self.answer(prompt)}"

    def candidate(self, prompt: str, rng: random.Random) -> str:
        if rng.random() < self.candidate_correct_rate:
            return f" {self.answer(prompt)}"
        return self._flawed(prompt, _pick(_CANDIDATE_FLAWS, rng), rng)

    def _flawed(self, prompt: str, flaw: str, rng: random.Random) -> str:
        """A response with the given kind of mistake; always scores gold 0."""
        answer = self.answer(prompt)
        if flaw == "trailing":
            return f" {answer}{rng.choice(_TRAILING)}"
        if flaw == "repeat":
            return f" {answer} {answer}"
        if flaw == "empty":
            return ""
        wrong = self._wrong_number(prompt, answer, flaw, rng)
        return f" {wrong}"

    def _wrong_number(self, prompt: str, answer: int, flaw: str, rng: random.Random) -> int:
        sign = rng.choice((-1, 1))
        if flaw == "off_by_ten":
            return answer + 10 * sign
        if flaw == "swap_digits":
            digits = str(abs(answer))
            swapped = int(digits[::-1]) * (1 if answer >= 0 else -1)
            if swapped != answer:
                return swapped
        if flaw == "wrong_operation":
            # The other operation on the same operands (b - a for subtraction: a sign slip).
            a, op, b = _PROMPT_RE.fullmatch(prompt).groups()
            other = int(a) - int(b) if op == "+" else int(b) - int(a)
            if other != answer:
                return other
        if flaw == "random":
            wrong = rng.randint(-self.max_operand, 2 * self.max_operand)
            if wrong != answer:
                return wrong
        return answer + sign

    def pretrain_texts(self, n: int, rng: random.Random) -> list[str]:
        """Lines of correctly solved train-split problems, 1-4 per text (no eval answers leak)."""
        texts = []
        for _ in range(n):
            prompts = self.sample_prompts(rng.randint(1, 4), rng)
            texts.append("\n".join(f"{p} {self.answer(p)}" for p in prompts))
        return texts

    def tokenizer_corpus(self, rng: random.Random) -> list[str]:
        """Every prompt with its answer, each kind of flawed answer and some pretraining text."""
        corpus = [f"{p} {self.answer(p)}" for p in self.all_prompts()]
        for prompt in self.all_prompts():
            corpus.append(prompt + self._flawed(prompt, _pick(_CANDIDATE_FLAWS, rng), rng))
        corpus += [f"Q: 1{t}" for t in _TRAILING]
        return corpus + self.pretrain_texts(200, rng)


def _pick(weights: dict[str, float], rng: random.Random) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


@cache
def _default_task() -> ArithmeticTask:
    return ArithmeticTask()


def gold(prompts: list[str], responses: list[str], **fields) -> list[float]:
    """The arithmetic gold reward as a reward function: `reward.functions=ppo_rlhf.tasks.arithmetic:gold`
    trains on the exact answer itself (a verifiable reward), with or without a reward model."""
    return _default_task().gold_rewards(prompts, responses)


def gold_steps(prompts: list[str], responses: list[str], **fields) -> list[list[tuple[int, float]]]:
    """A process-reward version of `gold`: per response, one step per character of the answer.

    Each leading character that matches the exact answer earns 0.5 / len(answer) at its offset,
    and the exact answer with nothing after it earns the other 0.5 at the end, so a correct
    response totals 1 (as `gold`) and a wrong one gets partial credit for its correct first digits.
    `reward.functions=ppo_rlhf.tasks.arithmetic:gold_steps` puts the credit on the digit tokens.
    """
    task, out = _default_task(), []
    for prompt, response in zip(prompts, responses):
        answer = str(task.answer(prompt))
        start = len(response) - len(response.lstrip())
        steps = []
        for k, char in enumerate(answer):
            if start + k >= len(response) or response[start + k] != char:
                break
            steps.append((start + k + 1, 0.5 / len(answer)))
        if response.lstrip() == answer:
            steps.append((len(response), 0.5))
        out.append(steps)
    return out
