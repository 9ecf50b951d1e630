"""Fixtures and arithmetic shared by the PPO benchmarks (ours vs TRL).

Everything here is importable from both the project's Python and the TRL virtualenv (it needs only
torch, transformers and tokenizers), so both sides load byte-identical inputs:

- a word-level tokenizer of 310 tokens: <|pad|>=0, <|eos|>=1, <|bos|>=2, <|unk|>=3, w0..w305;
- tiny random GPT-2 policies and reward models (the reward trunk is a copy of the policy's, its
  one-output head random), saved with `save_pretrained` next to the tokenizer;
- prompts of exactly `prompt_len` tokens ([bos] + prompt_len-1 words), as JSONL for our trainer and
  as token ids for TRL's dataset.

Full-length responses on both sides. TRL (stop_token=None) never stops early, but it treats a sampled
pad token as the end of the sequence (it rebuilds masks as `ids != pad`), while our sampler stops at
EOS. So the saved weights make pad and EOS unsampleable: their (tied) embedding rows are all -1 and
ln_f's bias is +1, so their logit is -d_model for every hidden state (LayerNorm output sums to zero
over features before the bias) -- probability ~e^-90 at temperature 0.7. Neither id ever appears in
an input (prompts have equal length, so no padding), so nothing else changes. Both workers count
pad/EOS tokens in the responses and report them (always 0), so both sides do B x (P + R) tokens.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

SPECIALS = ["<|pad|>", "<|eos|>", "<|bos|>", "<|unk|>"]
N_WORDS = 306  # 310 tokens with the specials, as in docs PERFORMANCE.md
N_PROMPTS = 1024


@dataclass(frozen=True)
class ModelShape:
    """A GPT-2 shape used for the policy, reference, value and reward models alike."""

    n_layer: int
    n_embd: int
    n_head: int = 4

    @property
    def name(self) -> str:
        return f"L{self.n_layer}-d{self.n_embd}"


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: the same for both sides."""

    model: ModelShape
    batch: int
    prompt_len: int
    response_len: int
    ppo_epochs: int = 2
    num_minibatches: int = 2
    device: str = "cpu"  # "cuda": both sides on the GPU
    # "fp32" or "bf16" (autocast, fp32 weights) on both sides, or "default": each side's own
    # default (ours: run.dtype's default; TRL: bf16=True unless fp16).
    precision: str = "fp32"

    @property
    def tokens_per_update(self) -> int:
        return self.batch * (self.prompt_len + self.response_len)

    @property
    def label(self) -> str:
        where = ("" if self.device == "cpu" else f" {self.device}") + f" {self.precision}"
        return f"{self.model.name} B={self.batch} {self.prompt_len}+{self.response_len}{where}"

    def at(self, precision: str) -> Case:
        """This configuration in another precision."""
        return replace(self, precision=precision)

    @property
    def shape_label(self) -> str:
        """The label without the precision."""
        return self.label.rsplit(" ", 1)[0]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Case:
        d = dict(d)
        d["model"] = ModelShape(**d["model"])
        return cls(**d)


def build_tokenizer(out_dir: Path):
    """The word-level tokenizer (saved to out_dir) -- same ids on both sides."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(N_WORDS)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", eos_token="<|eos|>",
                                  bos_token="<|bos|>", unk_token="<|unk|>", model_max_length=1024,
                                  clean_up_tokenization_spaces=False)
    tok.save_pretrained(out_dir)
    return tok


def _suppress_pad_and_eos(model, tok) -> None:
    """Make pad and EOS unsampleable (see the module docstring)."""
    import torch

    trunk = model.transformer
    with torch.no_grad():
        trunk.ln_f.bias.fill_(1.0)
        for tid in (tok.pad_token_id, tok.eos_token_id):
            trunk.wte.weight[tid].fill_(-1.0)


def build_models(shape: ModelShape, tok, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Policy dir (causal LM + tokenizer) and reward dir (sequence classifier, 1 label)."""
    import torch
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

    policy_dir, reward_dir = root / f"{shape.name}-policy", root / f"{shape.name}-reward"
    if (policy_dir / "config.json").is_file() and (reward_dir / "config.json").is_file():
        return policy_dir, reward_dir
    cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=shape.n_embd, n_layer=shape.n_layer,
                     n_head=shape.n_head, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     bos_token_id=tok.bos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    policy = GPT2LMHeadModel(cfg)
    _suppress_pad_and_eos(policy, tok)
    policy.save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    rcfg = GPT2Config.from_dict(cfg.to_dict())
    rcfg.num_labels = 1
    rcfg.architectures = None
    torch.manual_seed(seed + 1)
    reward = AutoModelForSequenceClassification.from_config(rcfg)
    reward.transformer.load_state_dict(policy.transformer.state_dict())
    reward.config.reward_gain = 1.0
    reward.config.reward_bias = 0.0
    reward.save_pretrained(reward_dir)
    tok.save_pretrained(reward_dir)
    return policy_dir, reward_dir


def build_prompts(prompt_len: int, root: Path, tok, seed: int = 0) -> tuple[Path, Path]:
    """N_PROMPTS distinct prompts of prompt_len-1 words: JSONL (ours) and ids with bos (TRL)."""
    jsonl, ids_path = root / f"prompts-{prompt_len}.jsonl", root / f"prompt_ids-{prompt_len}.json"
    if jsonl.is_file() and ids_path.is_file():
        return jsonl, ids_path
    rng = random.Random(seed + prompt_len)
    texts: set[str] = set()
    while len(texts) < N_PROMPTS:
        texts.add(" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(prompt_len - 1)))
    texts_list = sorted(texts)
    jsonl.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts_list))
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts_list]
    assert all(len(r) == prompt_len for r in ids), "every prompt must encode to prompt_len tokens"
    ids_path.write_text(json.dumps(ids))
    return jsonl, ids_path


def prepare(case: Case, root: Path) -> dict:
    """Build (or reuse) the tokenizer, models and prompts of `case` under `root`; return paths."""
    from transformers import AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok_dir = root / "tokenizer"
    tok = AutoTokenizer.from_pretrained(tok_dir) if (tok_dir / "tokenizer.json").is_file() \
        else build_tokenizer(tok_dir)
    policy_dir, reward_dir = build_models(case.model, tok, root)
    jsonl, ids_path = build_prompts(case.prompt_len, root, tok)
    return {"tokenizer": str(tok_dir), "policy": str(policy_dir), "reward": str(reward_dir),
            "prompts_jsonl": str(jsonl), "prompt_ids": str(ids_path)}


# -- FLOP count -----------------------------------------------------------------------------------
def _matmul_params(shape: ModelShape, vocab: int, lm_head: bool) -> int:
    """Weights that take part in a matmul per token: 12 L d^2 for the blocks, plus the head."""
    d = shape.n_embd
    return 12 * shape.n_layer * d * d + (vocab * d if lm_head else d)


def _forward_flops(shape: ModelShape, vocab: int, lm_head: bool, batch: int, seq: int) -> float:
    """2 N per token + causal attention (QK^T and AV: 4 d per attended pair per layer)."""
    pairs = seq * (seq + 1) / 2
    return batch * (2 * _matmul_params(shape, vocab, lm_head) * seq + 4 * shape.n_layer * shape.n_embd * pairs)


def useful_flops(case: Case, vocab: int = len(SPECIALS) + N_WORDS) -> dict[str, float]:
    """Model FLOPs one PPO update needs at least, per phase.

    generate: one policy forward over P + R - 1 positions (KV cache: each position once);
    score: reference, value and reward forwards over P + R (the old log-probs can come from the
    sampling logits, so a second policy forward is not counted as useful);
    train: ppo_epochs x (forward + backward = 3 x forward) of policy and value over the whole batch.
    """
    B, T = case.batch, case.prompt_len + case.response_len
    pol = lambda s: _forward_flops(case.model, vocab, True, B, s)  # noqa: E731
    sc = lambda s: _forward_flops(case.model, vocab, False, B, s)  # noqa: E731
    out = {"generate": pol(T - 1), "score": pol(T) + 2 * sc(T),
           "train": case.ppo_epochs * 3 * (pol(T) + sc(T))}
    out["total"] = sum(out.values())
    out["extra_policy_forward"] = pol(T)  # what recomputing old log-probs costs on top
    return out


def matmul_peak_gflops(threads: int, sizes=(512, 1024, 2048), repeats: int = 5,
                       dtype: str = "float32") -> float:
    """Best matmul GFLOP/s torch reaches here with `threads` threads in `dtype` ("float32" or
    "bfloat16"): the MFU denominator of runs in that precision.

    Both of torch's CPU GEMM libraries are tried: MKL (`a @ b`, torch's default for fp32) and
    oneDNN (`torch.ops.mkldnn._linear_pointwise`, what `ppo_rlhf.onednn` uses; torch's bf16 `a @ b`
    is oneDNN too). On AMD CPUs MKL takes its AVX2 path, so oneDNN's AVX-512 kernels reach about
    twice MKL's rate; the peak is the best of them, so that MFU never credits a library choice as
    utilisation.
    """
    import time

    import torch

    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    products = [lambda a, b: a @ b]
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        products.append(lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = 0.0
    for product in products:
        for n in sizes:
            a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
            product(a, b)
            for _ in range(repeats):
                t0 = time.perf_counter()
                product(a, b)
                best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def gpu_bf16_peak_tflops(n: int = 8192, repeats: int = 10) -> float:
    """Best bf16 matmul TFLOP/s on the current CUDA device (the GPU MFU denominator)."""
    import time

    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e12)
    return best


def gpu_memory_mb() -> float | None:
    """Peak GPU memory allocated by torch in this process (MB), or None without CUDA."""
    import torch

    return torch.cuda.max_memory_allocated() / 1e6 if torch.cuda.is_available() else None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (10^6 bytes); ru_maxrss is KiB on Linux."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def current_rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


# -- the machine and its other load ---------------------------------------------------------------
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# The CPU flags worth recording with a result: what decides which kernels torch can use.
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                 "amx_tile", "amx_bf16", "amx_int8")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """(model name, the NOTABLE_FLAGS this CPU has) from /proc/cpuinfo; ("unknown", []) without it."""
    model, flags = "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, [f for f in NOTABLE_FLAGS if f in flags]


def machine_kind() -> str:
    """A short label for the kind of machine a result comes from: results of different kinds are
    reported side by side, never in one ratio. E.g. 'AMD EPYC, AVX512-BF16, 2 cores'."""
    model, flags = cpu_model_and_flags()
    bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else \
        "AVX-512, no bf16" if "avx512f" in flags else "no AVX-512"
    return f"{model}, {bf16}, {os.cpu_count()} cores"


LABEL_HELP = ("a suffix of the results file name (results/NAME_TASK_LABEL.json), so that runs on "
              "another machine or at another commit do not overwrite it")


def suffix(label: str) -> str:
    """"_label" for a results file name ("" without a label)."""
    return f"_{label}" if label else ""


def cpu_jiffies() -> dict[str, int]:
    """The whole machine's CPU jiffies so far, from /proc/stat's first line (zeros without it):
    `busy` (user, nice, system, irq, softirq: work done in this VM), `steal` (time the hypervisor
    gave to other guests while this VM wanted the CPU) and `total` (busy, idle, iowait and steal;
    guest time is already inside user and nice, so it is not added again)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return {"busy": 0, "steal": 0, "total": 0}
    f += [0] * (8 - len(f))
    busy = f[0] + f[1] + f[2] + f[5] + f[6]
    return {"busy": busy, "steal": f[7], "total": busy + f[3] + f[4] + f[7]}


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine so far (`cpu_jiffies`; steal is not busy)."""
    j = cpu_jiffies()
    return j["busy"], j["total"]


class OtherLoad:
    """Cores kept busy by other processes while the block ran (machine busy time minus this
    process's CPU time, per wall second): a shared machine's load can swamp what is measured.
    `steal_cores` is the hypervisor's share (CPU time other guests took while this VM wanted it,
    per wall second): on a VM it makes the same work take longer with no other process running.

        with OtherLoad() as load:
            work()
        load.cores, load.steal_cores
    """

    def __enter__(self) -> OtherLoad:
        import time

        self._j = cpu_jiffies()
        self._own = sum(os.times()[:4])
        self._t0 = time.perf_counter()
        self.cores = self.steal_cores = 0.0
        return self

    def __exit__(self, *exc) -> None:
        import time

        wall = time.perf_counter() - self._t0
        j, tick = cpu_jiffies(), os.sysconf("SC_CLK_TCK")
        busy = (j["busy"] - self._j["busy"]) / tick
        own = sum(os.times()[:4]) - self._own
        self.cores = max(0.0, (busy - own) / wall) if wall > 0 else 0.0
        self.steal_cores = (j["steal"] - self._j["steal"]) / tick / wall if wall > 0 else 0.0
