"""A process reward for the arithmetic task, used by `benchmarks/algorithms.py --reward process`.

The gold reward is 1 for a response that is exactly the answer (" 42") and 0 otherwise, given once,
at the end. `answer_steps` splits the same total into two steps placed where they are earned:

- +0.5 at the character where the leading number ends, if that number is the answer;
- +0.5 at the end of the response, if the response is exactly the answer (no trailing text).

The steps sum to the gold reward, so the optimum is unchanged; the difference is credit
assignment: the reward for the right number lands on its last digit instead of the final token.
"""

from __future__ import annotations

import re

from ppo_rlhf.tasks.arithmetic import ArithmeticTask

_TASK = ArithmeticTask()
_NUMBER = re.compile(r"\s*-?\d+")


def answer_steps(prompts: list[str], responses: list[str], **_) -> list[list[tuple[int, float]]]:
    """Per response, [(character offset, reward), ...] (see the module docstring)."""
    out = []
    for prompt, response in zip(prompts, responses):
        answer = str(_TASK.answer(prompt))
        steps = []
        match = _NUMBER.match(response)
        if match is not None and match.group().strip() == answer:
            steps.append((match.end(), 0.5))
        steps.append((len(response), 0.5 if response.lstrip() == answer else 0.0))
        out.append(steps)
    return out
