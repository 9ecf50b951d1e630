"""Write the example user data (reverse the letters of a word) as JSONL, deterministically.

    python examples/reverse/make_data.py examples/reverse

The SFT demonstrations are imperfect (a quarter have a flaw), the preferences prefer the exact
answer to a flawed one, and the prompts carry the answer as a field for the gold function.
"""

import json
import random
import sys
from itertools import product
from pathlib import Path

LETTERS = "abcdef"


def flawed(word: str, rng: random.Random) -> str:
    target = word[::-1]
    kind = rng.choice(["unreversed", "swap", "extra", "drop"])
    if kind == "unreversed" and word != target:
        return word
    if kind == "swap" and len(target) > 2:
        i = rng.randrange(len(target) - 1)
        swapped = target[:i] + target[i + 1] + target[i] + target[i + 2:]
        if swapped != target:
            return swapped
    if kind == "drop":
        return target[:-1]
    return target + rng.choice(LETTERS)


def main(out: Path) -> None:
    rng = random.Random(0)
    words = ["".join(p) for n in (2, 3, 4) for p in product(LETTERS, repeat=n)]
    rng.shuffle(words)
    train, held_out = words[:-60], words[-60:]

    def prompt(w: str) -> str:
        return f"reverse {w} ="

    def write(name: str, rows: list[dict]) -> None:
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    sft = []
    for w in rng.choices(train, k=2000):
        response = flawed(w, rng) if rng.random() < 0.25 else w[::-1]
        sft.append({"prompt": prompt(w), "response": " " + response})
    prefs = []
    for w in rng.choices(train, k=2000):
        prefs.append({"prompt": prompt(w), "chosen": " " + w[::-1], "rejected": " " + flawed(w, rng)})
    write("sft_train", sft)
    write("prefs_train", prefs)
    write("prompts_train", [{"prompt": prompt(w), "answer": w[::-1]} for w in rng.sample(train, 500)])
    write("prompts_eval", [{"prompt": prompt(w), "answer": w[::-1]} for w in held_out])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
