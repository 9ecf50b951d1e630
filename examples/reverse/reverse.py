"""The example user task: reverse the letters of a word ("reverse abc =" -> " cba").

    ppo-rlhf pipeline --data examples/reverse --task examples/reverse/reverse.py:Reverse --out runs/reverse

`Reverse` implements the task protocol of docs/tasks.md (a gold reward and a response budget);
`gold` is the same reward as a gold / reward function. `answer` is a field of each
prompts_*.jsonl row: gold and reward functions receive the rows' fields as keyword arguments.
"""


def _target(prompt: str) -> str:
    return prompt.split()[1][::-1]


class Reverse:
    name = "reverse"
    description = "reverse the letters of a word; gold 1 for the exact answer"
    default_max_new_tokens = 8

    def gold_reward(self, prompt: str, response: str, answer: str | None = None, **fields) -> float:
        """1 for the exact reversed word (leading spaces allowed), else 0."""
        return 1.0 if response.strip() == (answer or _target(prompt)) else 0.0


def gold(prompts: list[str], responses: list[str], answer: list | None = None, **fields) -> list[float]:
    """`Reverse`'s gold reward for a batch: `gold=examples/reverse/reverse.py:gold`."""
    answers = answer or [None] * len(prompts)
    return [Reverse().gold_reward(p, r, a) for p, r, a in zip(prompts, responses, answers)]


def letters_ok(prompts: list[str], responses: list[str], **fields) -> list[float]:
    """A partial-credit reward function: the share of positions holding the right letter."""
    out = []
    for p, r in zip(prompts, responses):
        r, a = r.strip(), _target(p)
        out.append(sum(x == y for x, y in zip(r, a)) / max(len(a), len(r), 1))
    return out
