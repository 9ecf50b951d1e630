"""Preference labelling: a local web page that shows a prompt and two responses and records choices.

    pairs = load_pairs("pairs.jsonl")                # or pairs_from_model(model_dir, prompts, 40)
    serve(pairs, "prefs.jsonl", open_browser=True)   # blocks; keys 1 / 2 / t / s, u = undo

The output is the `{"prompt", "chosen", "rejected"}` JSONL the reward stage reads. Stdlib only.
"""

from ppo_rlhf.label.pairs import load_pairs, pairs_from_model
from ppo_rlhf.label.server import LabelStore, make_server, serve, skipped_path

__all__ = ["LabelStore", "load_pairs", "make_server", "pairs_from_model", "serve", "skipped_path"]
