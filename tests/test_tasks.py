"""Built-in tasks: generators, gold rewards, the simulated labeller and the data writer."""

import json
import math
import random
import statistics

import pytest

from ppo_rlhf.errors import UserError
from ppo_rlhf.tasks import TASKS, ArithmeticTask, SentimentTask, Task, get_task, write_task_data
from ppo_rlhf.tasks.sentiment import sentiment_gold

TASK_NAMES = sorted(TASKS)


def test_registry_and_did_you_mean():
    assert TASK_NAMES == ["arithmetic", "sentiment"]
    assert isinstance(get_task("arithmetic"), ArithmeticTask)
    assert get_task("arithmetic", demo_error_rate=0.1).demo_error_rate == 0.1
    with pytest.raises(UserError, match="did you mean 'arithmetic'.*arithmetic, sentiment"):
        get_task("arithmetc")
    with pytest.raises(UserError, match="choose one of"):
        get_task("zzz")
    with pytest.raises(UserError, match="demo_error_rate"):
        get_task("sentiment", demo_error_rate=1.5)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generators_are_deterministic_given_a_seed(name):
    task = get_task(name)

    def draw(seed):
        rng = random.Random(seed)
        prompts = task.sample_prompts(20, rng)
        return (
            prompts,
            [task.demonstration(p, rng) for p in prompts],
            [task.candidate(p, rng) for p in prompts],
            task.preference_pairs(10, rng, noise_temperature=0.3),
            task.pretrain_texts(5, rng),
        )

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_attributes_and_disjoint_splits(name):
    task = get_task(name)
    assert task.name == name and task.description
    assert task.default_max_new_tokens > 0 and task.default_max_prompt_len > 0
    train, held_out = set(task.prompts("train")), set(task.prompts("eval"))
    assert train and held_out and not train & held_out
    assert train | held_out == set(task.all_prompts())
    assert set(task.sample_prompts(200, random.Random(0))) <= train
    assert set(task.sample_prompts(50, random.Random(0), split="eval")) <= held_out


@pytest.mark.parametrize(
    "prompt, response, gold",
    [
        ("Q: 7+12=", " 19", 1.0),
        ("Q: 7+12=", "19", 1.0),
        ("Q: 3-5=", " -2", 1.0),
        ("Q: 0-0=", " 0", 1.0),
        ("Q: 7+12=", " 18", 0.0),  # off by one
        ("Q: 7+12=", " 91", 0.0),  # digits swapped
        ("Q: 7+12=", " 19 .", 0.0),  # trailing text
        ("Q: 7+12=", " 19 19", 0.0),
        ("Q: 7+12=", " 19 ", 0.0),
        ("Q: 7+12=", " 019", 0.0),
        ("Q: 3-5=", " 2", 0.0),
        ("Q: 7+12=", "", 0.0),
    ],
)
def test_arithmetic_gold_is_exact(prompt, response, gold):
    assert ArithmeticTask().gold_reward(prompt, response) == gold
    assert ArithmeticTask().gold_reward(prompt, response, truncated=True) == gold


def test_arithmetic_gold_rejects_foreign_prompts():
    with pytest.raises(UserError, match="not an arithmetic prompt"):
        ArithmeticTask().gold_reward("Review of the cafe:", " 3")


def test_arithmetic_demonstrations_are_wrong_at_the_error_rate():
    rng = random.Random(0)
    for rate in (0.0, 0.35, 1.0):
        task = ArithmeticTask(demo_error_rate=rate)
        prompts = task.sample_prompts(2000, rng)
        accuracy = statistics.mean(task.gold_reward(p, task.demonstration(p, rng)) for p in prompts)
        assert abs(accuracy - (1 - rate)) < 0.04  # flawed demos never happen to be right


def test_arithmetic_pretrain_texts_are_correct():
    task = ArithmeticTask()
    for text in task.pretrain_texts(50, random.Random(0)):
        for line in text.split("\n"):
            prompt, answer = line[: line.index("=") + 1], line[line.index("=") + 1 :]
            assert task.prompt_split(prompt) == "train"
            assert task.gold_reward(prompt, answer) == 1.0


@pytest.mark.parametrize(
    "response, gold",
    [
        (" the food was great.", 1 / 3),
        (" the food was great and the staff were rude.", 0.0),
        (" the food was great, the staff were lovely and the view was superb.", 1.0),
        (" the food was rude, but the staff were awful.", -2 / 3),
        (" the food was okay.", 0.0),
        # Repetition gains nothing and costs 0.1 per repeat.
        (" the food was great great great.", 1 / 3 - 0.2),
        # Praise must be about an aspect: an adjective list scores 0.
        (" great lovely superb.", 0.0),
        (" the food was great lovely superb.", 1 / 3),
        # 4 praised aspects cap at 1; 19 words are 5 over the budget of 14.
        (
            " the food was great, the staff were lovely, the view was superb and the tea was "
            "fresh.",
            1.0 - 0.3,
        ),
        ("", 0.0),
    ],
)
def test_sentiment_gold_by_hand(response, gold):
    assert sentiment_gold(response) == pytest.approx(gold)
    assert SentimentTask().gold_reward("Review of the cafe:", response) == pytest.approx(gold)


def test_sentiment_rambling_is_penalised():
    rambling = " the food was great" + ", the food was great" * 6 + "."
    assert sentiment_gold(rambling) < sentiment_gold(" the food was great.") - 1.0


def test_gold_spread_of_candidates_and_demonstrations():
    rng = random.Random(0)
    sentiment = SentimentTask()
    candidates = [sentiment_gold(sentiment.candidate("", rng)) for _ in range(2000)]
    demos = [sentiment_gold(sentiment.demonstration("", rng)) for _ in range(2000)]
    assert statistics.pstdev(candidates) > 0.4
    assert min(candidates) <= -1.0 and max(candidates) >= 2 / 3
    assert abs(statistics.mean(demos)) < 0.4  # mostly neutral or mixed: room to improve
    arithmetic = ArithmeticTask()
    prompts = arithmetic.sample_prompts(2000, rng)
    correct = statistics.mean(
        arithmetic.gold_reward(p, arithmetic.candidate(p, rng)) for p in prompts
    )
    assert 0.4 < correct < 0.6


def test_labeller_without_noise_follows_gold():
    task = ArithmeticTask()
    rng = random.Random(0)
    assert task.label_pair("Q: 1+1=", " 3", " 2", rng, 0.0) == (" 2", " 3")
    assert task.label_pair("Q: 1+1=", " 2", " 3", rng, 0.0) == (" 2", " 3")
    assert task.label_pair("Q: 1+1=", " 3", " 4", rng, 0.0) is None  # gold tie
    assert task.label_pair("Q: 1+1=", " 2", " 2", rng, 5.0) is None  # identical text
    for record in task.preference_pairs(200, rng, noise_temperature=0.0):
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
        assert task.gold_reward(prompt, chosen) > task.gold_reward(prompt, rejected)


def test_labeller_noise_is_bradley_terry():
    task = ArithmeticTask()
    rng = random.Random(0)
    n = 4000
    for temperature, expected in ((0.5, 1 / (1 + math.exp(-2))), (100.0, 0.5)):
        agree = sum(
            task.label_pair("Q: 1+1=", " 3", " 2", rng, temperature) == (" 2", " 3")
            for _ in range(n)
        )
        assert abs(agree / n - expected) < 0.03


@pytest.mark.parametrize("name", TASK_NAMES)
def test_rankings_with_k_responses(name):
    task = get_task(name)
    rng = random.Random(0)
    records = task.preference_pairs(50, rng, noise_temperature=0.0, k=4)
    for record in records:
        assert set(record) == {"prompt", "responses"}
        assert len(set(record["responses"])) == 4
        golds = [task.gold_reward(record["prompt"], r) for r in record["responses"]]
        assert golds == sorted(golds, reverse=True) and len(set(golds)) > 1
    with pytest.raises(UserError, match="k >= 2"):
        task.preference_pairs(1, rng, 0.0, k=1)


def test_noisy_rankings_agree_pairwise_with_bradley_terry():
    task = ArithmeticTask()
    rng = random.Random(0)
    n = 3000
    first_is_right = sum(task.rank("Q: 1+1=", [" 3", " 2"], rng, 0.5)[0] == " 2" for _ in range(n))
    assert abs(first_is_right / n - 1 / (1 + math.exp(-2))) < 0.03


@pytest.mark.parametrize("name", TASK_NAMES)
def test_tokenizer_corpus_covers_every_character(name):
    task = get_task(name)
    rng = random.Random(0)
    covered = set("".join(task.tokenizer_corpus(random.Random(1))))
    texts = task.pretrain_texts(100, rng)
    for prompt in task.sample_prompts(300, rng):
        texts += [prompt, task.demonstration(prompt, rng), task.candidate(prompt, rng)]
    assert set("".join(texts)) <= covered


@pytest.mark.parametrize("name", TASK_NAMES)
def test_write_task_data(tmp_path, name):
    task = get_task(name)
    sizes = dict(n_sft=60, n_prefs=40, n_prompts=30, n_eval=20)
    paths = write_task_data(task, tmp_path / "data", seed=3, noise_temperature=0.2, **sizes)
    fields = {
        "sft_train": {"prompt", "response"},
        "sft_eval": {"prompt", "response"},
        "prefs_train": {"prompt", "chosen", "rejected"},
        "prefs_eval": {"prompt", "chosen", "rejected"},
        "prompts_train": {"prompt"},
        "prompts_eval": {"prompt"},
        "pretrain": {"text"},
    }
    assert set(paths) == set(fields)
    records = {}
    for kind, path in paths.items():
        assert path == tmp_path / "data" / f"{kind}.jsonl"
        records[kind] = [json.loads(line) for line in path.read_text().splitlines()]
        assert records[kind] and all(set(r) == fields[kind] for r in records[kind])
        assert all(isinstance(v, str) for r in records[kind] for v in r.values())
    assert len(records["sft_train"]) == 60 and len(records["prefs_train"]) == 40
    assert len(records["prompts_train"]) == 30
    assert len({r["prompt"] for r in records["prompts_train"]}) == 30

    def prompts_of(kinds):
        return {r["prompt"] for k in kinds for r in records[k]}

    train = prompts_of(["sft_train", "prefs_train", "prompts_train"])
    held_out = prompts_of(["sft_eval", "prefs_eval", "prompts_eval"])
    assert not train & held_out
    for r in records["prefs_eval"]:  # exact gold labels
        assert task.gold_reward(r["prompt"], r["chosen"]) > task.gold_reward(
            r["prompt"], r["rejected"]
        )
    meta = json.loads((tmp_path / "data" / "task.json").read_text())
    assert meta["name"] == name and meta["seed"] == 3 and meta["noise_temperature"] == 0.2
    assert meta["sizes"]["prefs_train"] == 40

    again = write_task_data(task, tmp_path / "again", seed=3, noise_temperature=0.2, **sizes)
    assert all(again[k].read_bytes() == paths[k].read_bytes() for k in paths)


def test_write_task_data_rankings_and_default_noise(tmp_path):
    task = ArithmeticTask()
    paths = write_task_data(task, tmp_path, seed=0, n_sft=5, n_prefs=10, n_prompts=5, n_eval=5, k=3)
    ranking = json.loads(paths["prefs_train"].read_text().splitlines()[0])
    assert set(ranking) == {"prompt", "responses"} and len(ranking["responses"]) == 3
    meta = json.loads((tmp_path / "task.json").read_text())
    assert meta["noise_temperature"] == task.default_noise_temperature and meta["k"] == 3
    with pytest.raises(UserError, match="noise_temperature"):
        write_task_data(task, tmp_path, seed=0, noise_temperature=-1.0)


# ---- your own task (issue 12) ------------------------------------------------------------------
USER_TASK = '''
import random
from ppo_rlhf.tasks import Task


class Reverse:
    """Minimal protocol: a gold reward (with a row field) and a response budget."""
    name = "reverse"
    default_max_new_tokens = 12

    def gold_reward(self, prompt, response, answer=None, truncated=False):
        target = answer if answer is not None else prompt.split(":", 1)[1].strip()[::-1]
        return float(response.strip() == target) - (0.5 if truncated else 0.0)


class Echo(Task):
    """A full task with a data generator."""
    name = "echo"
    default_max_new_tokens = 4

    def all_prompts(self):
        return [f"say {w}:" for w in ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")]

    def demonstration(self, prompt, rng):
        return " " + prompt[4]

    def candidate(self, prompt, rng):
        return " " + rng.choice("abcdefghij")

    def gold_reward(self, prompt, response, *, truncated=False):
        return float(response.strip() == prompt[4])

    def pretrain_texts(self, n, rng):
        return [f"say a: a" for _ in range(n)]

    def tokenizer_corpus(self, rng):
        return [p + " " + p[4] for p in self.all_prompts()]


def length_gold(prompts, responses, **fields):
    return [float(len(r)) for r in responses]
'''


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "my_task.py"
    path.write_text(USER_TASK)
    return path


def test_a_user_task_class_from_a_file(task_file):
    from ppo_rlhf.tasks import UserTask

    task = get_task(f"{task_file}:Reverse")
    assert isinstance(task, UserTask) and task.name == "reverse" and task.default_max_new_tokens == 12
    assert task.gold_reward("rev: abc", " cba") == 1.0
    assert task.gold_rewards(["rev: abc", "rev: xy"], ["cba", "zz"], [False, True],
                             [{"answer": "cba"}, {"answer": "zz"}]) == [1.0, 0.5]
    with pytest.raises(UserError, match="has no data generator"):
        task.all_prompts()


def test_a_task_subclass_is_used_as_is_and_writes_data(task_file, tmp_path):
    task = get_task(f"{task_file}:Echo")
    assert isinstance(task, Task) and task.gold_rewards(["say b:"], [" b"]) == [1.0]
    paths = write_task_data(task, tmp_path / "data", seed=0, n_sft=4, n_prefs=4, n_prompts=4, n_eval=2)
    assert paths["sft_train"].read_text().count("\n") == 4


def test_a_gold_function_and_a_module_spec_are_tasks(task_file):
    from ppo_rlhf.tasks import gold_task

    assert get_task(f"{task_file}:length_gold").gold_rewards(["p"], ["abc"]) == [3.0]
    assert gold_task(gold="ppo_rlhf.tasks.arithmetic:gold").gold_reward("Q: 2+2=", " 4") == 1.0
    assert gold_task() is None
    with pytest.raises(UserError, match="has no attribute 'Nope'"):
        get_task(f"{task_file}:Nope")
    with pytest.raises(UserError, match="path/to/task.py:Class"):
        get_task("my_own_task")


def test_a_failing_user_gold_names_the_task_and_row(task_file):
    task = get_task(f"{task_file}:Reverse")
    with pytest.raises(UserError, match=r"gold reward of task '.*Reverse' raised on row 1"):
        task.gold_rewards(["rev: ab", "no colon"], ["ba", "x"])  # IndexError on the 2nd prompt


def test_data_for_a_task_without_generator_is_a_clear_error(task_file, tmp_path):
    from ppo_rlhf.config import DataConfig, build_config
    from ppo_rlhf.stages.tools import run_data

    cfg = build_config(DataConfig, overrides=[f"task={task_file}:Reverse", f"out_dir={tmp_path / 'd'}"])
    with pytest.raises(UserError, match="has no data generator"):
        run_data(cfg)
    cfg = build_config(DataConfig, overrides=[f"task={task_file}:Echo", f"out_dir={tmp_path / 'd'}",
                                              "n_sft=4", "n_prefs=4", "n_prompts=4", "n_eval=2"])
    assert set(run_data(cfg)["files"]) >= {"sft_train", "prefs_train", "prompts_train"}


def test_arithmetic_gold_steps_by_hand():
    from ppo_rlhf.rewards import RewardFunctions
    from ppo_rlhf.tasks.arithmetic import gold, gold_steps

    prompts = ["Q: 7+12=", "Q: 7+12=", "Q: 7+12=", "Q: 3-5="]
    responses = [" 19", " 18", " 19.", "-2"]
    assert gold_steps(prompts, responses) == [
        [(2, 0.25), (3, 0.25), (3, 0.5)],  # " 19": '1' ends at 2, '9' at 3, exact: 0.5 at the end
        [(2, 0.25)],  # " 18": only the first digit
        [(2, 0.25), (3, 0.25)],  # " 19.": digits right, not exact
        [(1, 0.25), (2, 0.25), (2, 0.5)],  # "-2"
    ]
    out = RewardFunctions([gold_steps]).score(prompts, responses, [{}] * 4, [0, 1, 2, 3])
    assert out.per_function["gold_steps"].tolist() == [1.0, 0.25, 0.5, 1.0]
    assert [float(s == 1.0) for s in out.per_function["gold_steps"].tolist()] == gold(prompts, responses)
