"""Sampling throughput: `ppo_rlhf.generation.generate` vs Hugging Face `model.generate`.

    python benchmarks/generation.py --out bench_generation.json
    python benchmarks/generation.py --models tiny-gpt2 small-gpt2 --threads 1 --out gen.json
    python benchmarks/generation.py --device cuda --models qwen-0.5b-like --out gen_gpu.json
    python benchmarks/generation.py --only group --out gen_group.json   # group rollouts only

Random models built from presets with a random word-level vocabulary (~512 tokens), left-padded
prompts of random length, pure sampling (temperature 1, no top-k/top-p) with a KV cache in both,
and no early stop: the EOS id is outside the vocabulary so every row runs to max_new_tokens.
HF `generate` runs on a stock copy of the model (Hugging Face's own nn.Linear / Conv1D layers,
i.e. torch's default matmul), ours on the model as `load_causal_lm` returns it (float32 CPU linear
layers on oneDNN, see ppo_rlhf/onednn.py); `--same-kernels` gives HF the oneDNN layers too, to
separate the decode loop's gain from the kernels'.
Each case is timed `--repeats` times after a warm-up, ours and HF interleaved (the machine may be
shared), and the medians are reported as generated tokens per second. One CPU thread by default
(`--threads`): both sides are overhead-bound at these sizes, and with two threads on a shared
2-core machine every small op stalls whenever another process holds the other core.

Group rollouts (GRPO / RLOO: n samples per prompt, `GROUP_CASES`): ours with
`generate(..., num_samples=n)` (each prompt's prefill once, its KV cache copied to its n rows) against
ours on the n-times repeated prompts ("separate": what a trainer without group sampling does) and
against HF `generate(num_return_sequences=n)` (which repeats the prompts before its prefill). Tokens
per second count the B x n x R generated tokens. Every case records the cores other processes kept
busy meanwhile ("other load"), and the report names the CPU model and its bf16 flags.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ppo_rlhf.fileio import atomic_write_json
from ppo_rlhf.generation import generate
from ppo_rlhf.models import count_parameters, load_causal_lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

# (batch, longest prompt, new tokens): the two shapes of the TRL anchors in PERFORMANCE.md.
CASES = [(8, 8, 16), (32, 16, 64)]
# (prompts, samples per prompt, longest prompt, new tokens): group rollouts, short and long prompts.
GROUP_CASES = [(8, 4, 16, 64), (4, 8, 96, 32)]  # tiny-gpt2: 128 positions


def random_vocab_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with `size` tokens: <|pad|>, <|eos|>, <|bos|>, <unk>, w0, w1, ..."""
    specials = ["<|pad|>", "<|eos|>", "<|bos|>", "<unk>"]
    words = [f"w{i}" for i in range(size - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|eos|>",
        bos_token="<|bos|>", unk_token="<unk>", padding_side="left",
    )


def left_padded_prompts(batch: int, max_len: int, vocab: int, pad_id: int, seed: int, device):
    """(B, P) random prompts with lengths in [P/2, P], left-padded, and their mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, max_len), generator=gen)
    lengths = torch.randint(max_len // 2, max_len + 1, (batch,), generator=gen)
    mask = torch.arange(max_len)[None, :] >= (max_len - lengths)[:, None]
    return ids.masked_fill(~mask, pad_id).to(device), mask.to(device)


def time_call(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def stock_copy(model):
    """`model` with Hugging Face's own layers: `load_causal_lm` switched its linear layers to
    oneDNN kernels (ppo_rlhf.onednn), which stock `model.generate` users do not have."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from ppo_rlhf.onednn import OneDNNConv1D, OneDNNLinear

    stock = copy.deepcopy(model)
    for module in stock.modules():
        if type(module) is OneDNNLinear:
            module.__class__ = nn.Linear
        elif type(module) is OneDNNConv1D:
            module.__class__ = Conv1D
    return stock


def bench_case(model, tokenizer, batch, prompt_len, new_tokens, repeats, device, dtype,
               same_kernels: bool = False) -> dict:
    pad = tokenizer.pad_token_id
    ids, mask = left_padded_prompts(batch, prompt_len, len(tokenizer), pad, 0, device)
    never = len(tokenizer) + 1  # an EOS id the model can never sample: full-length rows
    generator = torch.Generator(device=device).manual_seed(0)
    stock = model if same_kernels else stock_copy(model)

    def ours():
        response, _ = generate(
            model, ids, mask, max_new_tokens=new_tokens, eos_token_id=never,
            pad_token_id=tokenizer.pad_token_id, temperature=1.0, generator=generator,
        )
        assert response.shape == (batch, new_tokens)

    def hf():
        out = stock.generate(
            input_ids=ids, attention_mask=mask.long(), do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_new_tokens=new_tokens, eos_token_id=never,
            pad_token_id=tokenizer.pad_token_id, use_cache=True,
        )
        assert out.shape == (batch, prompt_len + new_tokens)

    times, cpu, load = timed({"ours": ours, "hf": hf}, repeats, device, dtype)
    tokens = batch * new_tokens
    ours_tps = tokens / statistics.median(times["ours"])
    hf_tps = tokens / statistics.median(times["hf"])
    cpu_ratio = statistics.median(cpu["hf"]) / statistics.median(cpu["ours"])
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "ours_tokens_per_s": round(ours_tps, 1), "hf_tokens_per_s": round(hf_tps, 1),
        "ratio": round(ours_tps / hf_tps, 3), "cpu_ratio": round(cpu_ratio, 3), "other_load_cores": load,
        "seconds": times, "cpu_seconds": cpu,
    }


def timed(fns: dict, repeats: int, device, dtype) -> tuple[dict, dict, float]:
    """({name: [wall s] * repeats}, {name: [CPU s] * repeats}, other load) for each function after a
    warm-up, the functions interleaved so that drift in the machine's load hits them alike. CPU
    seconds (this process, all threads) are the steadier figure on a shared machine: a descheduled
    process accrues wall time but not CPU time."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), bc.OtherLoad() as load:
        for fn in fns.values():  # warm-up
            fn()
        times = {name: [] for name in fns}
        cpu = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                c0 = time.process_time()
                times[name].append(time_call(fn, device))
                cpu[name].append(time.process_time() - c0)
    return times, cpu, round(load.cores, 2)


def bench_group_case(model, tokenizer, prompts, n, prompt_len, new_tokens, repeats, device, dtype,
                     same_kernels: bool = False) -> dict:
    """n samples for each of `prompts` prompts: ours grouped, ours on repeated prompts, HF."""
    pad = tokenizer.pad_token_id
    ids, mask = left_padded_prompts(prompts, prompt_len, len(tokenizer), pad, 0, device)
    repeated_ids, repeated_mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    never = len(tokenizer) + 1
    generator = torch.Generator(device=device).manual_seed(0)
    stock = model if same_kernels else stock_copy(model)
    rows = prompts * n

    def group():
        response, _ = generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=never,
                               pad_token_id=pad, temperature=1.0, generator=generator, num_samples=n)
        assert response.shape == (rows, new_tokens)

    def separate():
        response, _ = generate(model, repeated_ids, repeated_mask, max_new_tokens=new_tokens,
                               eos_token_id=never, pad_token_id=pad, temperature=1.0,
                               generator=generator)
        assert response.shape == (rows, new_tokens)

    def hf():
        out = stock.generate(
            input_ids=ids, attention_mask=mask.long(), do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_new_tokens=new_tokens, eos_token_id=never, pad_token_id=pad,
            use_cache=True, num_return_sequences=n,
        )
        assert out.shape == (rows, prompt_len + new_tokens)

    times, cpu, load = timed({"group": group, "separate": separate, "hf": hf}, repeats, device, dtype)
    tps = {name: rows * new_tokens / statistics.median(times[name]) for name in ("group", "separate", "hf")}
    cpu_s = {name: statistics.median(cpu[name]) for name in cpu}
    return {
        "prompts": prompts, "samples_per_prompt": n, "prompt_len": prompt_len, "new_tokens": new_tokens,
        **{f"{name}_tokens_per_s": round(v, 1) for name, v in tps.items()},
        "group_over_separate": round(tps["group"] / tps["separate"], 3),
        "group_over_hf": round(tps["group"] / tps["hf"], 3),
        "group_over_separate_cpu": round(cpu_s["separate"] / cpu_s["group"], 3),
        "group_over_hf_cpu": round(cpu_s["hf"] / cpu_s["group"], 3),
        "other_load_cores": load, "seconds": times, "cpu_seconds": cpu,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--models", nargs="+", default=["tiny-gpt2"], help="model presets")
    parser.add_argument("--vocab", type=int, default=512, help="tokenizer size")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (0: torch's default). 1 by default: with 2 threads on a shared "
        "2-core machine each small op waits whenever another process holds the other core",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or CUDA), both sides")
    parser.add_argument("--only", choices=("plain", "group"), default=None,
                        help="run only the plain cases or only the group-rollout cases")
    parser.add_argument("--same-kernels", action="store_true",
                        help="HF generate also gets the oneDNN linear layers (decode loop alone)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else None
    tokenizer = random_vocab_tokenizer(args.vocab)
    results, group_results = [], []
    for name in args.models:
        model = load_causal_lm(name, tokenizer).to(device).eval()
        for batch, prompt_len, new_tokens in CASES if args.only != "group" else []:
            row = bench_case(
                model, tokenizer, batch, prompt_len, new_tokens, args.repeats, device, dtype,
                args.same_kernels,
            )
            row.update(model=name, parameters=count_parameters(model))
            results.append(row)
            print(
                f"{name:14s} B={batch:<3d} P={prompt_len:<3d} R={new_tokens:<3d} "
                f"ours {row['ours_tokens_per_s']:>9.0f} tok/s   HF generate "
                f"{row['hf_tokens_per_s']:>9.0f} tok/s   x{row['ratio']:.2f} (CPU time "
                f"x{row['cpu_ratio']:.2f})   other load {row['other_load_cores']:.1f}",
                flush=True,
            )
        for prompts, n, prompt_len, new_tokens in GROUP_CASES if args.only != "plain" else []:
            row = bench_group_case(model, tokenizer, prompts, n, prompt_len, new_tokens,
                                   args.repeats, device, dtype, args.same_kernels)
            row.update(model=name, parameters=count_parameters(model))
            group_results.append(row)
            print(
                f"{name:14s} {prompts} prompts x n={n:<2d} P={prompt_len:<3d} R={new_tokens:<3d} "
                f"group {row['group_tokens_per_s']:>8.0f} tok/s   separate "
                f"{row['separate_tokens_per_s']:>8.0f} (x{row['group_over_separate']:.2f})   HF "
                f"num_return_sequences {row['hf_tokens_per_s']:>8.0f} (x{row['group_over_hf']:.2f}); CPU "
                f"time x{row['group_over_separate_cpu']:.2f} / x{row['group_over_hf_cpu']:.2f}   "
                f"other load {row['other_load_cores']:.1f}",
                flush=True,
            )
    report = {
        "benchmark": "generation",
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        ),
        "cpu": bc.cpu_model_and_flags()[0], "cpu_flags": bc.cpu_model_and_flags()[1],
        "machine_kind": bc.machine_kind(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vocab": args.vocab,
        "bf16": args.bf16,
        "hf_kernels": "oneDNN (same as ours)" if args.same_kernels else "stock",
        "results": results,
        "group_results": group_results,
    }
    atomic_write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
