"""Small commands around the training stages: tokenizer, data, generate."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from ..config import DataConfig, TokenizerConfig, to_dict
from ..data.collate import collate_prompts
from ..data.encode import encode_prompts
from ..data.jsonl import load_records, prompt_text, read_prompts
from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_text
from ..generation import generate
from ..models import load_causal_lm
from ..tasks import Task, get_task, write_task_data
from ..tokenizer import load_tokenizer, tokenizer_summary, train_tokenizer
from . import common
from .evaluate import decode_responses


def _texts_of(record) -> list[str]:
    """Every string a record carries (prompt/response/chosen/rejected/text)."""
    out = []
    for name in ("prompt", "response", "chosen", "rejected", "text"):
        value = getattr(record, name, None)
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            out.extend(m.get("content", "") for m in value if isinstance(m, dict))
    return out


def run_tokenizer(cfg: TokenizerConfig) -> dict:
    out = common.require(cfg.out_dir, "out_dir", "where to save the tokenizer (--out DIR)")
    if bool(cfg.task) == bool(cfg.texts):
        raise UserError("give exactly one of --task NAME or texts=FILE.jsonl[,FILE2.jsonl]")
    vocab_size = 512 if cfg.vocab_size is None else cfg.vocab_size
    if cfg.task:
        task = get_task(cfg.task)
        texts = task.tokenizer_corpus(random.Random(cfg.seed))
        vocab_size = task.default_vocab_size if cfg.vocab_size is None else cfg.vocab_size
    else:
        texts = []
        for path in cfg.texts.split(","):
            kind = _guess_kind(path)
            records, _ = load_records(path, kind)
            for r in records:
                texts.extend(_texts_of(r))
    tok = train_tokenizer(texts, vocab_size, out)
    summary = {"stage": "tokenizer", **tokenizer_summary(tok), "requested_vocab_size": vocab_size}
    if len(tok) < vocab_size:
        summary["vocab_note"] = vocab_note(len(tok), vocab_size, len(texts))
        print(f"[tokenizer] {summary['vocab_note']}", file=sys.stderr)
    summary["config"] = to_dict(cfg)
    atomic_write_json(Path(out) / "summary.json", summary)
    return summary


def vocab_note(got: int, asked: int, n_texts: int) -> str:
    """Why a trained vocabulary is smaller than asked, in a sentence."""
    return (f"vocabulary has {got} tokens, not the {asked} asked for: byte-level BPE starts from the "
            f"256 bytes and 3 special tokens and adds a merge only for a pair of symbols that occurs "
            f"in the text, and the {n_texts} texts ran out of such pairs after {got - 259} merges. "
            "That is fine (a smaller model input); more varied text gives more merges.")


def _guess_kind(path: str) -> str:
    """Read the first record's keys to pick the reader."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"texts: no such file: {p}")
    import json

    with p.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    keys = set(json.loads(line))
                except (ValueError, TypeError):
                    break
                if "text" in keys:
                    return "texts"
                if "chosen" in keys or "responses" in keys:
                    return "preferences"
                if "response" in keys or "messages" in keys:
                    return "sft"
                return "prompts"
    return "texts"


def run_data(cfg: DataConfig) -> dict:
    out = common.require(cfg.out_dir, "out_dir", "where to write the JSONL files (--out DIR)")
    task = get_task(cfg.task)
    if not isinstance(task, Task):
        raise UserError(f"task {cfg.task!r} has no data generator: it implements only the gold reward. "
                        "Give your own JSONL files (`ppo-rlhf pipeline --data DIR`), or subclass "
                        "ppo_rlhf.tasks.Task and implement its generator methods (docs/tasks.md)")
    paths = write_task_data(task, out, cfg.seed, n_sft=cfg.n_sft, n_prefs=cfg.n_prefs,
                            n_prompts=cfg.n_prompts, n_eval=cfg.n_eval, holdout=cfg.holdout,
                            noise_temperature=cfg.noise_temperature)
    summary = {"stage": "data", "files": {k: str(v) for k, v in paths.items()}, "config": to_dict(cfg)}
    atomic_write_json(Path(out) / "summary.json", summary)
    return summary


def run_generate(args) -> None:
    """Sample from a saved model: prompts from a JSONL file, or typed at the terminal."""
    model_dir = common.require_file(args.model_dir, "MODEL_DIR",
                                    "a directory saved by a stage, e.g. runs/demo/ppo/model")
    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), tok).eval()
    gen = torch.Generator().manual_seed(args.seed)

    def answer(prompts: list[str]) -> list[str]:
        ids, _ = encode_prompts(tok, prompts, 512)
        b = collate_prompts(ids, tok.pad_token_id)
        resp, mask = generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=args.max_new_tokens,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              temperature=args.temperature, top_p=args.top_p, generator=gen)
        return decode_responses(tok, resp, mask)[0]

    if args.prompts:
        examples, _ = read_prompts(args.prompts)
        if args.n:
            examples = examples[:args.n]
        rows = []
        for i in range(0, len(examples), 64):
            chunk = [e.prompt for e in examples[i:i + 64]]
            for prompt, response in zip(chunk, answer(chunk)):
                if args.out:
                    rows.append(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")
                else:
                    print(f"{prompt_text(prompt)}\t{response}")
        if args.out:
            atomic_write_text(args.out, "".join(rows))
            print(f"[generate] {len(rows)} rows {{\"prompt\", \"response\"}} -> {args.out}", file=sys.stderr)
        return
    if args.out:
        raise UserError("generate --out needs --prompts FILE.jsonl (interactive prompts print to the terminal)")
    print("Type a prompt and press Enter (Ctrl-D to quit).", file=sys.stderr)
    for line in sys.stdin:
        prompt = line.rstrip("\n")
        if prompt:
            print(answer([prompt])[0], flush=True)
