"""Where the pairs to label come from: a JSONL file, or two samples per prompt from a saved model."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ppo_rlhf.errors import UserError

log = logging.getLogger(__name__)

_FIX = ('fix: one JSON object per line, {"prompt": ..., "a": ..., "b": ...} or '
        '{"prompt": ..., "chosen": ..., "rejected": ...}')


def load_pairs(path: str | Path) -> list[dict]:
    """Pairs `{"prompt", "a", "b"}` from a JSONL file of such records or of preference records.

    A `{"prompt", "chosen", "rejected"}` record is shown with its responses in an order fixed by
    a hash of its text (not always chosen first), so relabelling an existing preference set does
    not hint at its old label. Exact duplicates are dropped with a warning naming both lines.
    Errors name file:line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; fix: pass a JSONL file of pairs to label")
    pairs, first_line = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            pair = _parse_pair(line, f"{path}:{lineno}")
            key = (pair["prompt"], *sorted((pair["a"], pair["b"])))
            if key in first_line:
                log.warning("%s:%d: duplicate of line %d, skipped", path, lineno, first_line[key])
                continue
            first_line[key] = lineno
            pairs.append(pair)
    if not pairs:
        raise UserError(f"{path}: no pairs in the file; {_FIX}")
    return pairs


def _parse_pair(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg}); {_FIX}") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}; {_FIX}")
    if "a" in record or "b" in record:
        fields = ("prompt", "a", "b")
    elif "chosen" in record or "rejected" in record:
        fields = ("prompt", "chosen", "rejected")
    else:
        raise UserError(f"{where}: no response fields (found {', '.join(sorted(record)) or 'none'}); {_FIX}")
    for name in fields:
        if name not in record:
            raise UserError(f"{where}: field {name!r} is missing; {_FIX}")
        if not isinstance(record[name], str):
            raise UserError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}; "
                            "fix: labelling needs plain-text prompts and responses")
    prompt, a, b = (record[name] for name in fields)
    if fields[1] == "chosen" and _hash_bit(prompt, a, b):
        a, b = b, a
    return {"prompt": prompt, "a": a, "b": b}


def _hash_bit(*texts: str) -> int:
    """A stable coin flip from the texts (Python's `hash` changes between runs)."""
    return hashlib.sha256("\x00".join(texts).encode("utf-8")).digest()[0] & 1


REDRAWS = 3
"""How many times a pair whose two responses came out identical is sampled again."""


def pairs_from_model(model_dir: str | Path, prompts_path: str | Path, n_pairs: int, *,
                     max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
                     batch_size: int = 32, redraws: int = REDRAWS) -> list[dict]:
    """`n_pairs` pairs of two sampled responses each, from a model saved by a stage.

    Pair i uses prompt i of the file (cycling when the file has fewer prompts). A pair whose two
    responses are identical (a confident model: "8" and "8") is sampled again, up to `redraws`
    times; one still identical stays in the list, and the labelling page skips it and says so.
    Sampling is seeded, so the same arguments give the same pairs -- and a restarted session
    skips the pairs it has already labelled.
    """
    import torch

    from ppo_rlhf.data.collate import collate_prompts
    from ppo_rlhf.data.encode import encode_prompts
    from ppo_rlhf.data.jsonl import read_prompts
    from ppo_rlhf.generation import generate
    from ppo_rlhf.models import load_causal_lm
    from ppo_rlhf.tokenizer import load_tokenizer

    if n_pairs < 1:
        raise UserError(f"the number of pairs must be at least 1, got {n_pairs}")
    if temperature <= 0:
        raise UserError(f"temperature {temperature} samples the same response twice; "
                        "fix: use a temperature > 0")
    if not Path(model_dir).is_dir():
        raise UserError(f"{model_dir}: not a directory; fix: pass a model saved by a stage, "
                        "e.g. runs/demo/sft/model")
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer).eval()
    examples, _ = read_prompts(prompts_path)
    if not examples:
        raise UserError(f"{prompts_path}: no prompts; fix: one {{\"prompt\": ...}} object per line")
    for example in examples:
        if not isinstance(example.prompt, str):
            raise UserError(f"{example.source}: labelling shows plain-text prompts, this one is a messages "
                            'list; fix: use {"prompt": "..."} records')
    prompts = [examples[i % len(examples)].prompt for i in range(n_pairs)]
    ids, _ = encode_prompts(tokenizer, prompts, _max_prompt_len(model.config, max_new_tokens))
    generator = torch.Generator().manual_seed(seed)

    def sample_twice(prompt_ids: list[list[int]]) -> list[tuple[str, str]]:
        responses: list[str] = []
        with torch.no_grad():
            for start in range(0, len(prompt_ids), batch_size):
                rows = [p for p in prompt_ids[start:start + batch_size] for _ in range(2)]  # each prompt twice
                batch = collate_prompts(rows, tokenizer.pad_token_id)
                response_ids, response_mask = generate(
                    model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    temperature=temperature, generator=generator,
                )
                responses += [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                              for r, m in zip(response_ids, response_mask)]
        return list(zip(responses[0::2], responses[1::2]))

    drawn = sample_twice(ids)
    for _ in range(redraws):  # identical responses compare nothing: sample those pairs again
        same = [i for i, (a, b) in enumerate(drawn) if a == b]
        if not same:
            break
        for i, pair in zip(same, sample_twice([ids[i] for i in same])):
            drawn[i] = pair
    return [{"prompt": p, "a": a, "b": b} for p, (a, b) in zip(prompts, drawn)]


def _max_prompt_len(config, max_new_tokens: int, cap: int = 512) -> int:
    """Prompt tokens that fit next to `max_new_tokens` in the model's context window."""
    window = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if window is None:
        return cap
    if window - max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                        f"{window}-token context; fix: lower max_new_tokens")
    return min(cap, window - max_new_tokens)
