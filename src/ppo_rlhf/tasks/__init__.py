"""Built-in tasks with a programmatic gold reward: the CPU demo and the test bed.

from ppo_rlhf.tasks import get_task, write_task_data
task = get_task("arithmetic")
write_task_data(task, "runs/data/arithmetic", seed=0)
"""

from __future__ import annotations

import difflib

from ppo_rlhf.errors import UserError
from ppo_rlhf.tasks.arithmetic import ArithmeticTask
from ppo_rlhf.tasks.base import Task, write_task_data
from ppo_rlhf.tasks.sentiment import SentimentTask

TASKS: dict[str, type[Task]] = {
    ArithmeticTask.name: ArithmeticTask,
    SentimentTask.name: SentimentTask,
}


def get_task(name: str, **kwargs) -> Task:
    """The task registered as `name`, built with `kwargs` (e.g. demo_error_rate=0.2)."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown task {name!r}; {hint}choose one of: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "Task", "ArithmeticTask", "SentimentTask", "get_task", "write_task_data"]
