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
from ppo_rlhf.tasks.user import UserTask

TASKS: dict[str, type[Task]] = {
    ArithmeticTask.name: ArithmeticTask,
    SentimentTask.name: SentimentTask,
}


def get_task(name: str, **kwargs) -> Task | UserTask:
    """The task `name` names, built with `kwargs` (e.g. demo_error_rate=0.2):

    - a built-in task (`arithmetic`, `sentiment`);
    - `path/to/task.py:Class` or `module:Class`: your task class (see `tasks.user` for the
      protocol); a subclass of `Task` is used as is, any other class is wrapped in `UserTask`;
    - `path/to/file.py:fn` or `module:fn`: a gold function fn(prompts, responses, **fields).
    """
    if name in TASKS:
        return TASKS[name](**kwargs)
    if ":" not in name:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown task {name!r}; {hint}choose one of: {', '.join(sorted(TASKS))}, or "
                        "give your own as path/to/task.py:Class (or module:Class, or a gold function "
                        "module:fn); see docs/tasks.md")
    from ppo_rlhf.rewards import load_object

    obj = load_object(name, "task", "task spec")
    if isinstance(obj, type):
        try:
            instance = obj(**kwargs)
        except TypeError as err:
            raise UserError(f"task {name!r}: {obj.__name__}() cannot be built without arguments "
                            f"({err}); give the class defaults for its constructor's arguments") from err
        return instance if isinstance(instance, Task) else UserTask.from_object(instance, name)
    if callable(obj):
        return UserTask.from_function(obj, name)
    return UserTask.from_object(obj, name)


def gold_task(task: str = "", gold: str = "") -> Task | UserTask | None:
    """The task whose gold reward an evaluation reports: `task`, or a gold function `gold`
    (`module:fn`), or None when neither is set."""
    if task and gold:
        raise UserError(f"both task={task!r} and gold={gold!r} are set; give one: a task brings its own "
                        "gold reward")
    if gold:
        from ppo_rlhf.rewards import load_object

        fn = load_object(gold, "gold", "gold-function spec")
        if not callable(fn):
            raise UserError(f"gold: {gold!r} is a {type(fn).__name__}, not a function "
                            "fn(prompts, responses, **fields) -> list[float]")
        return UserTask.from_function(fn, gold)
    return get_task(task) if task else None


__all__ = ["TASKS", "Task", "UserTask", "ArithmeticTask", "SentimentTask", "get_task", "gold_task",
           "write_task_data"]
