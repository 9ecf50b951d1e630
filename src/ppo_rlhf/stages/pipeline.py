"""The whole InstructGPT loop, one stage after another:

    tokenizer -> data -> sft -> reward -> ppo -> eval

    ppo-rlhf pipeline --task arithmetic --out runs/demo      # a built-in task's generated data
    ppo-rlhf pipeline --data my_data/ --out runs/mine        # your own JSONL files
    ppo-rlhf pipeline --task arithmetic --out runs/cmp --compare ppo,dpo,online_dpo

With `--data DIR` (or `data_dir=files.yaml`, a YAML mapping the names below to paths), the files are

    sft_train.jsonl     {"prompt", "response"} or {"messages"}        required
    prefs_train.jsonl   {"prompt", "chosen", "rejected"} or rankings   required (unless reward functions
                                                                        replace the reward model)
    prompts_train.jsonl {"prompt", ...any fields}                      required
    sft_eval.jsonl, prefs_eval.jsonl, prompts_eval.jsonl, pretrain.jsonl ({"text"})   optional

The tokenizer is trained on your text. Without prefs_eval / prompts_eval, `eval_fraction` of the
preference records / prompts (whole prompts, seeded) is split off for evaluation into RUN/data/.
`task=` or `gold=` gives the gold reward that every evaluation reports (docs/tasks.md).

Every stage writes into RUN/<stage>/ and is skipped when its output already exists, so an
interrupted pipeline continues where it stopped. RUN/summary.json gathers the figures and
RUN/report.html shows them. A setting you give (command line, YAML, keyword) is kept; only the
ones you leave at their defaults are filled in from the run directory and the task.

`--compare M1,M2,...` (`compare=`) runs, after the shared tokenizer, data, SFT and reward model,
each method into RUN/<method>/ -- `ppo` (the RL stage, `ppo.*`), another RL algorithm preset such as
`grpo` or `rloo` (the RL stage with `algo=NAME`, then whatever you set under `ppo.`), a preference
loss `dpo`, `ipo`, `simpo`, `kto`, `orpo` (the DPO stage on the preference pairs, `dpo.*`),
`online_dpo` (the DPO stage with online.enabled, labelled by the reward model) -- then evaluates
SFT and every method on the held-out prompts, greedy and sampled at `eval.temperature`, into
RUN/compare.json: gold reward, RM score, KL to the SFT model and the method's wall time.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..algo.preference import PREFERENCE_LOSSES
from ..config import (
    OnlineDPOConfig,
    PipelineConfig,
    _flatten,
    _selects_preset,
    algorithm_presets,
    load_yaml,
    parse_override,
    set_key,
    to_dict,
)
from ..data.jsonl import load_records
from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_text
from ..tasks import gold_task
from .dpo import run_dpo
from .evaluate import run_eval
from .reward import run_reward
from .rl import run_ppo
from .sft import run_sft
from .tools import run_data, run_tokenizer

STAGES = ("tokenizer", "data", "sft", "reward", "ppo", "eval")

USER_FILES = {
    "sft_train": "sft", "sft_eval": "sft", "prefs_train": "preferences", "prefs_eval": "preferences",
    "prompts_train": "prompts", "prompts_eval": "prompts", "pretrain": "texts",
}
"""The user-data file names (without .jsonl) and the reader of each."""


def _done(path: Path) -> bool:
    return (path / "summary.json").is_file()


def _read_summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def explicit_keys(yaml_path: str | Path | None = None, overrides: Iterable[str] = (),
                  base: dict | None = None) -> set[str]:
    """The dotted keys a user set (YAML file, `key=value` overrides, a dict): `configure` keeps them."""
    keys = {k for k, _ in _flatten(base or {})}
    if yaml_path:
        keys |= {k for k, _ in _flatten(load_yaml(yaml_path))}
    keys |= {parse_override(text)[0] for text in overrides}
    return keys


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, key: str, value: Any) -> None:
    *head, last = key.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def user_data_files(data: str) -> dict[str, Path]:
    """{name: path} of the user's files in a directory, or as listed by a YAML file."""
    p = Path(data)
    if p.is_dir():
        found = {name: p / f"{name}.jsonl" for name in USER_FILES if (p / f"{name}.jsonl").is_file()}
        where = f"{p}/"
    elif p.is_file() and p.suffix in (".yaml", ".yml"):
        listed = load_yaml(p)
        unknown = sorted(set(listed) - set(USER_FILES))
        if unknown:
            raise UserError(f"{p}: unknown file name(s) {', '.join(unknown)}; the names are "
                            f"{', '.join(USER_FILES)}")
        found = {name: (p.parent / str(path)) for name, path in listed.items()}
        for name, path in found.items():
            if not path.is_file():
                raise UserError(f"{p}: {name}: no such file {path} (relative paths start at {p.parent})")
        where = f"{p}"
    else:
        raise UserError(f"data_dir: {p} is neither a directory of JSONL files nor a .yaml file listing them")
    missing = [n for n in ("sft_train", "prompts_train") if n not in found]
    if missing:
        raise UserError(f"data_dir: {where} has no {' or '.join(f'{n}.jsonl' for n in missing)}; a "
                        f"pipeline on your data needs sft_train.jsonl ({{\"prompt\", \"response\"}}), "
                        "prompts_train.jsonl ({\"prompt\"}) and prefs_train.jsonl ({\"prompt\", "
                        "\"chosen\", \"rejected\"}; not needed with ppo.reward.functions)")
    return found


def _reward_functions_given(cfg: PipelineConfig, reward_functions: Sequence | None) -> bool:
    return bool(getattr(cfg.ppo.reward, "functions", "")) or bool(reward_functions)


def configure(cfg: PipelineConfig, explicit: Iterable[str] = (),
              reward_functions: Sequence[Callable] | None = None) -> PipelineConfig:
    """Fill every stage's paths and shared settings from the run directory, the task and the data.

    A key is filled only when the user did not set it: it is not in `explicit` (the keys given on
    the command line, in YAML or as keywords) and still holds its default value.
    """
    explicit = set(explicit)
    defaults = PipelineConfig()

    def fill(key: str, value: Any) -> None:
        if key not in explicit and _get(cfg, key) == _get(defaults, key):
            _set(cfg, key, value)

    run = Path(cfg.out_dir)
    data = run / "data"
    if cfg.data_dir:
        fill("task", "")  # your own data: no built-in task unless you name one
    task_obj = gold_task(cfg.task, cfg.gold)
    gold = cfg.task or cfg.gold  # what the sft and ppo stages' `task` key takes
    if cfg.algo:
        apply_preset_under(cfg.ppo, cfg.algo, explicit, where="algo: ")

    fill("tokenizer.out_dir", str(run / "tokenizer"))
    if cfg.data_dir:
        files = resolve_user_files(cfg, reward_functions)
        given = user_data_files(cfg.data_dir)  # the tokenizer reads your files as given
        fill("tokenizer.texts", ",".join(str(given[n]) for n in ("sft_train", "prefs_train", "prompts_train",
                                                                    "pretrain") if n in given))
    else:
        files = {name: data / f"{name}.jsonl" for name in USER_FILES}
        fill("tokenizer.task", cfg.task)
        fill("data.task", cfg.task)
        fill("data.seed", cfg.seed)
    fill("data.out_dir", str(data))
    max_new_tokens = task_obj.default_max_new_tokens if task_obj else 32

    fill("sft.out_dir", str(run / "sft"))
    fill("sft.train_file", str(files["sft_train"]))
    fill("sft.eval_file", str(files.get("sft_eval", "")))
    fill("sft.task", gold)
    fill("sft.eval_prompts_file", str(files["prompts_eval"]) if gold else "")
    fill("sft.eval_temperature", cfg.ppo.rollout.temperature)
    fill("sft.model.path", cfg.model)
    fill("sft.model.tokenizer", cfg.tokenizer.out_dir)
    fill("sft.run.seed", cfg.seed)
    from ..models import model_spec

    cfg.sft.model.path = model_spec(cfg.sft.model)

    has_rm = "prefs_train" in files
    fill("reward.out_dir", str(run / "reward"))
    fill("reward.train_file", str(files.get("prefs_train", "")))
    fill("reward.eval_file", str(files.get("prefs_eval", "")))
    fill("reward.norm_prompts_file", str(files["prompts_train"]))
    fill("reward.max_new_tokens", cfg.ppo.rollout.max_new_tokens or max_new_tokens)
    fill("reward.norm_temperature", cfg.ppo.rollout.temperature)  # normalised on the RL stage's samples
    fill("reward.model.path", str(Path(cfg.sft.out_dir) / "model"))
    fill("reward.run.seed", cfg.seed)

    fill("ppo.out_dir", str(run / "ppo"))
    fill("ppo.policy", str(Path(cfg.sft.out_dir) / "model"))
    fill("ppo.reward_model", str(Path(cfg.reward.out_dir) / "model") if has_rm else "")
    fill("ppo.prompts_file", str(files["prompts_train"]))
    fill("ppo.eval_prompts_file", str(files["prompts_eval"]))
    fill("ppo.ptx_file", str(files.get("pretrain", "")))
    fill("ppo.task", gold)
    fill("ppo.run.seed", cfg.seed)

    fill("dpo.out_dir", str(run / "dpo"))
    fill("dpo.policy", str(Path(cfg.sft.out_dir) / "model"))
    fill("dpo.train_file", str(files.get("prefs_train", "")))
    fill("dpo.eval_file", str(files.get("prefs_eval", "")))
    fill("dpo.eval_prompts_file", str(files["prompts_eval"]))
    fill("dpo.reward_model", str(Path(cfg.reward.out_dir) / "model") if has_rm else "")
    fill("dpo.task", gold)
    fill("dpo.eval_temperature", cfg.ppo.rollout.temperature)
    fill("dpo.run.seed", cfg.seed)

    fill("eval.policy", str(Path(cfg.ppo.out_dir) / "model"))
    fill("eval.reference", cfg.ppo.policy)
    fill("eval.reward_model", cfg.ppo.reward_model)
    fill("eval.prompts_file", cfg.ppo.eval_prompts_file)
    fill("eval.task", cfg.task)
    fill("eval.gold", cfg.gold)
    fill("eval.temperature", cfg.ppo.rollout.temperature)
    fill("eval.seed", cfg.seed + 4242)
    return cfg


def resolve_user_files(cfg: PipelineConfig, reward_functions: Sequence | None = None) -> dict[str, Path]:
    """Where each stage reads the user's data: the given files, or RUN/data/ for the ones the data
    stage splits off (prefs_eval from prefs_train, prompts_eval from prompts_train)."""
    files = user_data_files(cfg.data_dir)
    data = Path(cfg.out_dir) / "data"
    if "prefs_train" not in files and not _reward_functions_given(cfg, reward_functions):
        raise UserError(f"data_dir: {cfg.data_dir} has no prefs_train.jsonl for the reward model; add one "
                        "({\"prompt\", \"chosen\", \"rejected\"} per line), or train on reward "
                        "functions instead: ppo.reward.functions=path/to/file.py:fn")
    for train, held_out in (("prefs_train", "prefs_eval"), ("prompts_train", "prompts_eval")):
        if train in files and held_out not in files:
            files[train], files[held_out] = data / f"{train}.jsonl", data / f"{held_out}.jsonl"
    return files


def split_off(lines: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held out) lines: whole prompts (all records of one prompt together), about
    `fraction` of the records and at least one prompt held out, chosen by a seeded shuffle."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        record = json.loads(line)
        key = json.dumps(record.get("prompt", record.get("messages")), sort_keys=True)
        groups.setdefault(key, []).append(line)
    if len(groups) < 2:
        raise UserError(f"cannot split off an evaluation set: the file has {len(groups)} distinct prompt(s); "
                        "give an eval file (prefs_eval.jsonl / prompts_eval.jsonl)")
    order = list(groups)
    random.Random(seed).shuffle(order)
    held: list[str] = []
    target = max(1, round(fraction * len(lines)))
    for key in order[:-1]:  # the last group always stays for training
        if len(held) >= target:
            break
        held.extend(groups.pop(key))
    train = [line for key in order if key in groups for line in groups[key]]
    return train, held


def prepare_user_data(cfg: PipelineConfig) -> dict:
    """The data stage for your own files: read and check every file (each report printed), write
    the split-off evaluation files into RUN/data/, and RUN/data/summary.json."""
    given = user_data_files(cfg.data_dir)
    out = Path(cfg.data.out_dir)
    reports, splits = {}, {}
    for name, path in given.items():
        _, report = load_records(path, USER_FILES[name])
        reports[name] = report.describe()
        print(f"[data] {report.describe()}")
    for train, held_out in (("prefs_train", "prefs_eval"), ("prompts_train", "prompts_eval")):
        if train in given and held_out not in given:
            lines = [ln for ln in given[train].read_text(encoding="utf-8").splitlines() if ln.strip()]
            kept, held = split_off(lines, cfg.eval_fraction, cfg.seed)
            atomic_write_text(out / f"{train}.jsonl", "".join(ln + "\n" for ln in kept))
            atomic_write_text(out / f"{held_out}.jsonl", "".join(ln + "\n" for ln in held))
            splits[held_out] = f"{len(held)} of {len(lines)} records of {given[train]} held out (whole prompts)"
            print(f"[data] {held_out}: {splits[held_out]}")
    summary = {"stage": "data", "source": cfg.data_dir, "files": {k: str(v) for k, v in given.items()},
               "read": reports, "split": splits}
    atomic_write_json(out / "summary.json", summary)
    return summary


def run_pipeline(cfg: PipelineConfig, explicit: Iterable[str] = (),
                 reward_functions: Sequence[Callable] | None = None) -> dict:
    """Run (or continue) every stage; returns the run summary. `explicit`: see `configure`;
    `reward_functions`: Python callables added to the RL stage's reward (see `ppo_rlhf.rewards`)."""
    explicit = set(explicit)
    cfg = configure(cfg, explicit, reward_functions)
    if cfg.compare:
        compare_methods(cfg.compare)  # a misspelt method is an error before any stage runs
    run = Path(cfg.out_dir)
    run.mkdir(parents=True, exist_ok=True)
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    seconds = summary.get("stage_seconds", {})

    def stage(name: str, fn, out: Path) -> None:
        if _done(out):
            print(f"[pipeline] {name}: output exists in {out}, skipped")
            return
        print(f"[pipeline] {name} -> {out}")
        t0 = time.time()
        result = fn()
        if isinstance(result, dict) and "stopped_at" in result:
            print(f"[pipeline] stopped during {name}; run the same pipeline command again to continue "
                  f"(finished stages are skipped, {name} resumes from its newest checkpoint)")
            raise SystemExit(0)
        seconds[name] = round(time.time() - t0, 2)

    if dist.is_main():
        stage("tokenizer", lambda: run_tokenizer(cfg.tokenizer), Path(cfg.tokenizer.out_dir))
        prepare = (lambda: prepare_user_data(cfg)) if cfg.data_dir else (lambda: run_data(cfg.data))
        stage("data", prepare, Path(cfg.data.out_dir))
    dist.barrier()
    # resume=True: a stage interrupted in an earlier call continues from its newest checkpoint
    stage("sft", lambda: run_sft(cfg.sft, resume=True), Path(cfg.sft.out_dir))
    if cfg.ppo.reward_model:
        stage("reward", lambda: run_reward(cfg.reward, resume=True), Path(cfg.reward.out_dir))
    rl_kwargs = {"reward_functions": list(reward_functions)} if reward_functions else {}
    if cfg.compare:
        return run_comparison(cfg, summary, seconds, stage,
                              lambda rl: run_ppo(rl, resume=True, **rl_kwargs), explicit)
    stage("ppo", lambda: run_ppo(cfg.ppo, resume=True, **rl_kwargs), Path(cfg.ppo.out_dir))

    eval_dir = run / "eval"

    def evaluate() -> None:
        ppo_res = run_eval(cfg.eval)
        cfg.eval.policy = cfg.eval.reference
        sft_res = run_eval(cfg.eval)
        if dist.is_main():
            atomic_write_json(eval_dir / "summary.json", {"stage": "eval", "ppo": ppo_res, "sft": sft_res})

    stage("eval", evaluate, eval_dir)
    ev = _read_summary(eval_dir)
    rm = _read_summary(Path(cfg.reward.out_dir)) if cfg.ppo.reward_model else {}
    summary.update({
        "task": cfg.task or cfg.gold or None, "data": cfg.data_dir or "generated",
        "algo": cfg.ppo.algo.name, "eval_temperature": cfg.eval.temperature,
        # sampled at eval.temperature (the RL stage's), and greedy
        "sft_gold_reward": ev["sft"].get("gold_reward"), "sft_gold_reward_std": ev["sft"].get("gold_reward_std"),
        "sft_gold_reward_greedy": ev["sft"].get("gold_reward_greedy"),
        "ppo_gold_reward": ev["ppo"].get("gold_reward"), "ppo_gold_reward_std": ev["ppo"].get("gold_reward_std"),
        "ppo_gold_reward_greedy": ev["ppo"].get("gold_reward_greedy"),
        "sft_rm_score": ev["sft"].get("rm_score"), "ppo_rm_score": ev["ppo"].get("rm_score"),
        "final_kl": ev["ppo"].get("kl"), "rm_accuracy": rm.get("eval_accuracy"),
        "eval_prompts": ev["ppo"].get("n"), "eval_distinct_prompts": ev["ppo"].get("distinct_prompts"),
        "stage_seconds": seconds, "config": to_dict(cfg),
    })
    if dist.is_main():
        atomic_write_json(summary_path, summary)
        from ..report import write_report

        summary["report"] = str(write_report(run))
    return summary


RL_PRESETS = tuple(p for p in algorithm_presets() if p != "ppo")
COMPARE_METHODS = ("ppo", "online_dpo", *PREFERENCE_LOSSES, *RL_PRESETS)
"""What `compare` takes: the RL stage, online DPO, each registered preference loss, and each other RL
algorithm preset."""


def compare_methods(text: str) -> list[str]:
    """The methods of `compare=a,b,c`, checked (unknown or repeated names are errors)."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown:
        raise UserError(f"compare: unknown method(s) {', '.join(unknown)}; the methods are "
                        f"{', '.join(COMPARE_METHODS)}")
    if len(set(methods)) != len(methods):
        raise UserError(f"compare: {text!r} names a method twice")
    return methods


def method_config(cfg: PipelineConfig, method: str):
    """The DPO stage's config of a compared preference method, in RUN/<method>/."""
    dpo = copy.deepcopy(cfg.dpo)
    dpo.out_dir = str(Path(cfg.out_dir) / method)
    if method == "online_dpo":
        dpo.online.enabled = True
        dpo.train_file = ""
        dpo.prompts_file = cfg.ppo.prompts_file
        if not dpo.reward_model and not dpo.online.functions:
            dpo.online.functions = cfg.ppo.reward.functions
            dpo.online.weights = cfg.ppo.reward.weights
    else:
        dpo.loss = method
        dpo.online = OnlineDPOConfig()  # the online settings are online_dpo's
    return dpo


def apply_preset_under(rl: Any, name: str, explicit: Iterable[str], where: str) -> None:
    """Apply the algorithm preset `name` to the RL stage's config `rl` (in place) as a base: every
    `ppo.*` key you set (`explicit`) keeps the value it had."""
    given = {k[len("ppo."):] for k in explicit if k.startswith("ppo.") and not _selects_preset(k)}
    kept = {key: _get(rl, key) for key in sorted(given)}
    set_key(rl, "algo", name, where=where)
    for key, value in kept.items():
        _set(rl, key, value)


def preset_config(cfg: PipelineConfig, name: str, explicit: Iterable[str] = ()):
    """The RL stage's config of a compared algorithm preset, in RUN/<name>/: the pipeline's RL
    settings with the preset `name` applied under every `ppo.*` key you set."""
    rl = copy.deepcopy(cfg.ppo)
    apply_preset_under(rl, name, explicit, where=f"compare {name}: ")
    rl.out_dir = str(Path(cfg.out_dir) / name)
    return rl


def run_comparison(cfg: PipelineConfig, summary: dict, seconds: dict, stage: Callable, rl_stage: Callable,
                   explicit: Iterable[str] = ()) -> dict:
    """`compare`: each method from the shared SFT model and reward model, then one evaluation of
    SFT and of every method (greedy and sampled) into RUN/compare.json and the run summary.
    `rl_stage(config)` runs the RL stage (with the pipeline's reward functions)."""
    run = Path(cfg.out_dir)
    methods = compare_methods(cfg.compare)
    dirs = {"sft": Path(cfg.sft.out_dir)}
    for method in methods:
        if method == "ppo":
            stage("ppo", lambda: rl_stage(cfg.ppo), Path(cfg.ppo.out_dir))
            dirs[method] = Path(cfg.ppo.out_dir)
        elif method in RL_PRESETS:
            rl = preset_config(cfg, method, explicit)
            stage(method, lambda rl=rl: rl_stage(rl), Path(rl.out_dir))
            dirs[method] = Path(rl.out_dir)
        else:
            mcfg = method_config(cfg, method)
            stage(method, lambda mcfg=mcfg: run_dpo(mcfg, resume=True), Path(mcfg.out_dir))
            dirs[method] = Path(mcfg.out_dir)

    def evaluate() -> None:
        rows = {}
        for name, out in dirs.items():
            row = {}
            for kind, temperature in (("", cfg.eval.temperature), ("_greedy", 0.0)):
                ecfg = copy.deepcopy(cfg.eval)
                ecfg.policy, ecfg.reference, ecfg.temperature = str(out / "model"), cfg.ppo.policy, temperature
                res = run_eval(ecfg)
                row.update({f"{k}{kind}": res.get(k) for k in ("gold_reward", "rm_score", "kl")})
            row["seconds"] = seconds.get(name) or _read_summary(out).get("seconds")
            rows[name] = row
        if dist.is_main():
            atomic_write_json(run / "compare.json", {"stage": "compare", "methods": list(dirs),
                                                     "eval_prompts": cfg.eval.n, "temperature": cfg.eval.temperature,
                                                     "results": rows})

    if dist.is_main() and (run / "compare.json").is_file():
        print(f"[pipeline] compare: output exists in {run / 'compare.json'}, skipped")
    else:
        t0 = time.time()
        evaluate()
        seconds["compare"] = round(time.time() - t0, 2)
    compare = json.loads((run / "compare.json").read_text())
    rm = _read_summary(Path(cfg.reward.out_dir)) if cfg.ppo.reward_model else {}
    results = compare["results"]
    summary.update({
        "task": cfg.task or cfg.gold or None, "data": cfg.data_dir or "generated",
        "sft_gold_reward": results["sft"]["gold_reward"], "rm_accuracy": rm.get("eval_accuracy"),
        "compare": results, "stage_seconds": seconds, "config": to_dict(cfg),
    })
    if "ppo" in results:
        summary.update(ppo_gold_reward=results["ppo"]["gold_reward"], final_kl=results["ppo"]["kl"])
    if dist.is_main():
        atomic_write_json(run / "summary.json", summary)
        from ..report import write_report

        summary["report"] = str(write_report(run))
    return summary
