"""Models: causal LMs (policy, reference) and scalar models (reward, value), built or loaded.

Every model is a plain Hugging Face model so that a saved directory loads with `transformers` (and
TRL) without this package:

- policy / reference: `AutoModelForCausalLM` (GPT-2, Llama, Qwen2, ... shapes);
- reward / value: `AutoModelForSequenceClassification` with `num_labels=1`, i.e. the causal LM's
  trunk (`model.base_model`) plus a linear head `model.score` applied at every position.

A spec is either a preset name from `MODEL_PRESETS` (random init from a config, sized to the
tokenizer), a size spec `gpt2:layers=4,hidden=128,heads=4` / `llama:...` (what `model.arch`,
`model.layers`, `model.hidden`, `model.heads` resolve to, see `model_spec`) or a local directory
written by `save_pretrained`. Nothing is ever fetched from a hub.

Reward normalisation (InstructGPT: RM scores shifted/scaled so that a reference set has mean 0 and
std 1) is stored as `config.reward_gain` / `config.reward_bias`, so it travels with config.json.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers.activations import GELUTanh, NewGELUActivation

from ppo_rlhf.algo.advantages import last_token_index
from ppo_rlhf.data.collate import position_ids_from_mask
from ppo_rlhf.errors import UserError
from ppo_rlhf.fileio import atomic_directory
from ppo_rlhf.onednn import use_onednn

# GPT-2 models built here (presets and size specs) use the exact GELU ("gelu", erf): torch's CPU
# kernel of the tanh approximation ("gelu_pytorch_tanh"; GPT-2's "gelu_new" as six ops is slower
# still) takes ~4x the exact one's time, forward + backward at (32, 16, 512): 1.87 vs 0.49 ms, one
# thread. A whole training step (forward, backward, fused AdamW), exact against tanh, interleaved in
# one process on a quiet 2-core Xeon with AMX: tiny-gpt2 B=32 x 16 1.08x faster, B=64 1.10x;
# small-gpt2 B=32 x 80 1.05x in float32 and 1.18x under bf16 autocast. The two functions differ by
# at most ~5e-4; directories saved with either keep theirs.
GPT2_ACTIVATION = "gelu"
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # CPU test bed: two blocks, overhead-bound.
    "tiny-gpt2": {
        "model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 128,
        "activation_function": GPT2_ACTIVATION,
    },
    "tiny-llama": {
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
        "max_position_embeddings": 128, "tie_word_embeddings": True,
    },
    # CPU demo that does measurable arithmetic (the 4-layer d=256 configuration of
    # benchmarks/README.md).
    "small-gpt2": {
        "model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256,
        "activation_function": GPT2_ACTIVATION,
    },
    # GPU benchmark shape: Qwen2-0.5B's dimensions (~360M parameters without the embedding).
    "qwen-0.5b-like": {
        "model_type": "qwen2", "num_hidden_layers": 24, "hidden_size": 896,
        "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
        "max_position_embeddings": 4096, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
}

# Config fields holding dropout probabilities, per architecture family (GPT-2 / Llama-like).
_DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout")

_LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{
        name: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for name in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")
    },
}


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside DDP and peft wrappers (LoRA layers stay injected in it)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@contextmanager
def capture_output(module: nn.Module) -> Iterator[list]:
    """Collect what `module` returns while the block runs.

    Scoring calls the whole model -- so that a DDP wrapper sees the forward and synchronises the
    gradients -- and takes the trunk's or the head's output on the way.
    """
    outputs: list = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def load_causal_lm(
    spec: str | Path,
    tokenizer,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    dropout: float = 0.0,
) -> PreTrainedModel:
    """A causal LM from a preset name (seeded random init) or a local `save_pretrained` directory.

    Presets get `vocab_size = len(tokenizer)` and the tokenizer's pad/eos/bos ids; `dropout` sets
    every dropout probability of a preset (directories keep their saved config). A directory whose
    tokenizer had no pad token (GPT-2, Llama 3) gets one embedding row for the pad token that
    `load_tokenizer` added.
    """
    path = Path(spec)
    if path.is_dir():
        _require_config(path)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        _add_pad_embedding(model, tokenizer)
    else:
        config = _preset_config(str(spec), tokenizer, dropout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        if dtype is not None:
            model = model.to(dtype)
    _check_vocab(model, tokenizer, spec)
    _set_special_ids(model.config, tokenizer)
    _speed_up(model)
    return model


def load_q_model(spec: str | Path, tokenizer, *, seed: int = 0, head_init_std: float = 1e-3) -> PreTrainedModel:
    """A soft Q critic over the vocabulary: the causal LM at `spec` (its trunk) with a new, untied
    output layer of small random weights (seeded, so two critics differ), whose logits are read as
    Q(s, .) in R^V (SAC's critic). Q starts near 0, the value of a policy equal to its prior."""
    model = load_causal_lm(spec, tokenizer)
    head = model.get_output_embeddings()
    hidden, vocab = head.weight.shape[1], head.weight.shape[0]
    new = nn.Linear(hidden, vocab, bias=False, device=head.weight.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(new.weight, std=head_init_std)
    model.config.tie_word_embeddings = False  # the head is the critic's own, not the input embedding
    model.set_output_embeddings(new)
    return model


def load_scalar_model(
    spec_or_dir: str | Path,
    tokenizer,
    *,
    init_from_causal_lm: bool = False,
    head_init_std: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """A reward/value model: `AutoModelForSequenceClassification` with one output.

    With `init_from_causal_lm`, `spec_or_dir` is a causal LM (SFT directory or preset): its trunk is
    copied and the head `score` is drawn from N(0, head_init_std) (zeros when 0), as InstructGPT
    initialises the RM from the SFT model. Otherwise `spec_or_dir` is a saved scalar model (an RM,
    to initialise the value model from) and is loaded as is.
    """
    if init_from_causal_lm:
        causal = load_causal_lm(spec_or_dir, tokenizer, seed=seed, dtype=dtype)
        config = copy.deepcopy(causal.config)
        config.num_labels = 1
        config.architectures = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_config(config)
            model.base_model.load_state_dict(causal.base_model.state_dict())
            _init_head(model.score, head_init_std)
        model = model.to(next(causal.parameters()).dtype)
        model.config.reward_gain = 1.0
        model.config.reward_bias = 0.0
    else:
        path = Path(spec_or_dir)
        if not path.is_dir():
            raise UserError(
                f"scalar model '{spec_or_dir}': no such directory; fix: give the directory a "
                "reward stage saved, or set init_from_causal_lm to start from an SFT model or "
                "preset"
            )
        _require_config(path)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        architectures = config.architectures or []
        if config.num_labels != 1 or not any("SequenceClassification" in a for a in architectures):
            raise UserError(
                f"{path}/config.json: architectures={architectures}, num_labels="
                f"{config.num_labels}; a reward/value model is a *ForSequenceClassification with "
                "num_labels=1; fix: point at a directory saved by the reward stage, or set "
                "init_from_causal_lm to start a reward model from this causal LM"
            )
        score_bias = _saved_score_bias(path)
        # HF's score head has no bias, so a folded one would be reported as an unused weight.
        with _quiet_load_report() if score_bias is not None else nullcontext():
            model = AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, dtype=dtype
            )
        if score_bias is not None:
            _add_score_bias(model).copy_(score_bias)
        _check_vocab(model, tokenizer, spec_or_dir)
    _set_special_ids(model.config, tokenizer)
    _speed_up(model)
    return model


def _speed_up(model: nn.Module) -> None:
    """Same model, faster kernels: fused GELU, (float32 CPU) oneDNN linear layers and float32
    attention under CPU bf16 autocast."""
    fuse_gelu(model)
    use_onednn(model)
    install_cpu_bf16_attention()


def _sdpa_fp32_on_cpu_bf16(original):
    """Transformers' `sdpa` attention function, run in float32 when its inputs are CPU bf16."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if query.device.type != "cpu":
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        # Llama's rotary embedding hands float32 q/k to SDPA, which autocast would cast to bf16.
        autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if not (autocast_bf16 or query.dtype == torch.bfloat16):
            return original(module, query, key, value, attention_mask, *args, **kwargs)

        def up(t):
            return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        if "position_bias" in kwargs:
            kwargs["position_bias"] = up(kwargs["position_bias"])
        with torch.autocast("cpu", enabled=False):  # autocast would cast SDPA's inputs back to bf16
            out, weights = original(module, up(query), up(key), up(value), up(attention_mask), *args, **kwargs)
        return out.to(torch.bfloat16), weights

    attention.ppo_rlhf_wrapped = original
    return attention


def install_cpu_bf16_attention() -> None:
    """Make the Hugging Face models' `sdpa` attention compute in float32 when it is given CPU bf16
    tensors (under `run.dtype=bfloat16`); every other call is unchanged. Idempotent.

    Why: torch's CPU flash-attention kernel is slow in bf16, above all its backward. Measured on a
    2-core Xeon with AMX (torch 2.13, (16, 4, 80, 64), causal mask, forward + backward): bf16 16.4
    ms, float32 5.1 ms, bf16 inputs cast to float32 and back 3.6 ms; in a 4L d=256 B=32 bf16 PPO
    update the bf16 backward was 18% of the time. Float32 scores are also the more accurate.
    Registered through transformers' `AttentionInterface` (the documented way to replace an
    attention function), so it holds for every model in the process, ours or not; our own decoders
    (generation.py) call SDPA themselves and are not affected.
    """
    from transformers import AttentionInterface

    current = AttentionInterface._global_mapping["sdpa"]
    if not hasattr(current, "ppo_rlhf_wrapped"):
        AttentionInterface.register("sdpa", _sdpa_fp32_on_cpu_bf16(current))


def fuse_gelu(model: nn.Module) -> int:
    """Run GPT-2's `gelu_new` activations as one fused kernel; returns how many were swapped.

    `gelu_new` (`NewGELUActivation`) is 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3))) written as
    six elementwise ops, each a kernel launch and most kept for backward. `gelu_pytorch_tanh` is
    the same function as one `F.gelu(approximate="tanh")` kernel (max difference ~2e-7 in float32).
    Measured at 4 layers d=256, B=32: the unfused ops were ~0.85 s of a 2.3 s PPO update and a
    third of its peak memory (benchmarks/README.md). Only the module changes; config.json keeps
    its `activation_function`, so saved models are unchanged.
    """
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


ARCHS = ("gpt2", "llama", "qwen2")
"""Architectures that `model.arch` (or a size spec `ARCH:layers=..`) builds from scratch."""

_SIZE_KEYS = ("layers", "hidden", "heads")
_SIZE_DEFAULTS = {"layers": 2, "hidden": 128, "heads": 4}
_SPEC_CONTEXT = 512


def size_preset(arch: str, layers: int, hidden: int, heads: int) -> dict[str, Any]:
    """A preset dict (as in `MODEL_PRESETS`) for `arch` at the given size.

    GPT-2: learned positions over a 512-token context. Llama: as tiny-llama, MLP width 2 x hidden,
    half as many key/value heads as heads (grouped-query attention) when heads is even. Qwen2: the
    Llama shape with qwen-0.5b-like's biased q/k/v projections, rope theta and norm epsilon.
    """
    if arch not in ARCHS:
        raise UserError(f"model.arch: {arch!r} is not one of {', '.join(ARCHS)}")
    for key, value in (("layers", layers), ("hidden", hidden), ("heads", heads)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"model.{key}: {value!r}; use a positive integer")
    if hidden % heads:
        raise UserError(f"model.hidden={hidden} is not divisible by model.heads={heads}; each head "
                        f"gets hidden/heads dimensions (e.g. model.heads={_divisor_near(hidden, heads)})")
    if arch == "gpt2":
        return {"model_type": "gpt2", "n_layer": layers, "n_embd": hidden, "n_head": heads,
                "n_positions": _SPEC_CONTEXT, "activation_function": GPT2_ACTIVATION}
    kv = heads // 2 if heads % 2 == 0 else heads
    preset = {"model_type": arch, "num_hidden_layers": layers, "hidden_size": hidden,
              "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": 2 * hidden,
              "max_position_embeddings": _SPEC_CONTEXT, "tie_word_embeddings": True}
    if arch == "qwen2":
        preset.update(rope_theta=1_000_000.0, rms_norm_eps=1e-6)
    return preset


def hidden_size(spec: str | Path) -> int | None:
    """A model's width (GPT-2 `n_embd`, Llama `hidden_size`) from a preset name, a size spec or a
    directory's config.json, without loading it; None when it cannot be told (e.g. a LoRA adapter
    directory, or a path that does not exist yet)."""
    path = Path(spec)
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
    else:
        config = MODEL_PRESETS.get(str(spec)) or parse_size_spec(str(spec)) or {}
    width = config.get("n_embd", config.get("hidden_size"))
    return int(width) if isinstance(width, int) else None


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


def parse_size_spec(spec: str) -> dict[str, Any] | None:
    """`gpt2:layers=4,hidden=128,heads=4` -> its preset dict; None when `spec` is not of that form.

    Missing sizes take tiny's (2 layers, hidden 128, 4 heads).
    """
    arch, sep, rest = spec.partition(":")
    if not sep or arch not in ARCHS:
        return None
    sizes = dict(_SIZE_DEFAULTS)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in _SIZE_KEYS:
            raise UserError(f"model {spec!r}: cannot read {item!r}; write e.g. "
                            f"{arch}:layers=4,hidden=128,heads=4")
        try:
            sizes[key.strip()] = int(value)
        except ValueError:
            raise UserError(f"model {spec!r}: {key.strip()}={value!r} is not an integer") from None
    return size_preset(arch, sizes["layers"], sizes["hidden"], sizes["heads"])


def model_spec(cfg) -> str:
    """What to load for an `SFTModelConfig`: model.path, or, when model.arch/layers/hidden/heads are
    set, the size spec `ARCH:layers=L,hidden=H,heads=N` of a model built from scratch.

    Unset sizes come from the preset model.path names (e.g. tiny-llama + model.layers=4), else from
    tiny's. Vocabulary size and special ids always come from the tokenizer.
    """
    given = {k: getattr(cfg, k, None) for k in _SIZE_KEYS}
    arch = getattr(cfg, "arch", None)
    if arch is None and all(v is None for v in given.values()):
        return cfg.path
    if cfg.path and Path(cfg.path).is_dir():
        raise UserError(f"model.arch/layers/hidden/heads build a model from scratch, but model.path="
                        f"{cfg.path} is a saved model directory (whose size is in its config.json); "
                        "drop the size options or model.path")
    base = MODEL_PRESETS.get(cfg.path) or parse_size_spec(cfg.path) or {}
    base_arch = base.get("model_type", "") if base.get("model_type") in ARCHS else "gpt2"
    sizes = {
        "layers": base.get("n_layer", base.get("num_hidden_layers", _SIZE_DEFAULTS["layers"])),
        "hidden": base.get("n_embd", base.get("hidden_size", _SIZE_DEFAULTS["hidden"])),
        "heads": base.get("n_head", base.get("num_attention_heads", _SIZE_DEFAULTS["heads"])),
    }
    sizes.update({k: v for k, v in given.items() if v is not None})
    arch = arch or base_arch
    size_preset(arch, **sizes)  # validate now, before any work
    return f"{arch}:layers={sizes['layers']},hidden={sizes['hidden']},heads={sizes['heads']}"


def preset_size(name: str) -> str:
    """`gpt2, 2 layers, hidden 128, 4 heads, 128-token context, ~0.4M parameters + embeddings`."""
    p = MODEL_PRESETS.get(name) or parse_size_spec(name)
    if p is None:
        raise UserError(f"{name!r} is not a preset")
    layers = p.get("n_layer", p.get("num_hidden_layers"))
    hidden = p.get("n_embd", p.get("hidden_size"))
    heads = p.get("n_head", p.get("num_attention_heads"))
    context = p.get("n_positions", p.get("max_position_embeddings"))
    if p["model_type"] == "gpt2":
        per_layer = 12 * hidden * hidden  # attention 4 d^2 + MLP 8 d^2
    else:
        kv = p["num_key_value_heads"] * hidden // heads
        per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * p["intermediate_size"]
    params = layers * per_layer
    count = f"{params / 1e6:.1f}M" if params >= 1e5 else f"{params / 1e3:.0f}k"
    return (f"{p['model_type']}, {layers} layers, hidden {hidden}, {heads} heads, {context}-token "
            f"context, ~{count} parameters without embeddings")


def check_model_spec(spec: str | Path) -> None:
    """Raise a UserError unless `spec` is an existing directory, a preset name or a size spec
    (`gpt2:layers=4,hidden=128,heads=4`): a typo, a directory not yet written."""
    name = str(spec)
    if Path(spec).is_dir() or name in MODEL_PRESETS or parse_size_spec(name) is not None:
        return
    close = difflib.get_close_matches(name, MODEL_PRESETS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"model '{name}' is neither a local model directory nor a preset.{hint} "
        f"Presets: {', '.join(MODEL_PRESETS)}; fix: pass a preset name or the path of a "
        "directory written by save_pretrained (models are never downloaded)"
    )


def _preset_config(name: str, tokenizer, dropout: float):
    check_model_spec(name)
    kwargs = dict(MODEL_PRESETS.get(name) or parse_size_spec(name))
    model_type = kwargs.pop("model_type")
    special = {
        key: getattr(tokenizer, key)
        for key in ("pad_token_id", "eos_token_id", "bos_token_id")
        if getattr(tokenizer, key, None) is not None
    }
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **special, **kwargs)
    for field in _DROPOUT_FIELDS:
        if isinstance(getattr(config, field, None), float):
            setattr(config, field, float(dropout))
    return config


def _require_config(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path}: no config.json, so this is not a saved model directory; fix: point at a "
            "directory written by save_pretrained (e.g. a stage's output) or use a preset"
        )


def _add_pad_embedding(model: PreTrainedModel, tokenizer) -> None:
    """Grow the embeddings by one row when the tokenizer's only token beyond them is its pad.

    The row is the mean of the others (HF's mean resizing), so the pad token's logit is an
    average one and sampling it stays as unlikely as for a typical token; pads are masked as
    inputs. Any other excess is a mismatched tokenizer, which `_check_vocab` reports.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) == rows + 1 and tokenizer.pad_token_id == rows:
        with torch.random.fork_rng(devices=[]):  # mean resizing draws (negligible) noise
            model.resize_token_embeddings(rows + 1)


def _check_vocab(model: PreTrainedModel, tokenizer, spec) -> None:
    model_vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > model_vocab:
        raise UserError(
            f"model '{spec}': the tokenizer has {len(tokenizer)} tokens but the model's embedding "
            f"has only {model_vocab}; fix: use the tokenizer the model was trained with, or build "
            "the model from a preset with this tokenizer"
        )


_SPECIAL_IDS = ("pad_token_id", "eos_token_id", "bos_token_id")


def vocab_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's token -> id mapping (added tokens included), in hex."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_same_tokenizer(a, what_a: str, b, what_b: str) -> None:
    """Refuse two models that were not trained with one tokenizer; UserError naming both.

    `a`, `b`: a model directory (the tokenizer saved beside the weights, as every stage saves it)
    or a loaded tokenizer; `what_a`, `what_b` say which model each is ("policy", "reward model").
    Compared: vocabulary size, the pad/eos/bos ids and the vocabulary itself (token -> id). A
    reward model trained on another vocabulary scores ids that mean other tokens -- silently,
    whenever its embedding is large enough -- so any difference is an error. A preset name (not
    a directory) is built for whatever tokenizer it is given, so it matches by construction and
    is not checked.
    """
    from ppo_rlhf.tokenizer import load_tokenizer

    def resolve(x):
        if isinstance(x, (str, Path)):
            return (load_tokenizer(x), str(x)) if Path(x).is_dir() else (None, str(x))
        return x, getattr(x, "name_or_path", "") or "a loaded tokenizer"

    (tok_a, where_a), (tok_b, where_b) = resolve(a), resolve(b)
    if tok_a is None or tok_b is None:
        return
    differences = []
    if len(tok_a) != len(tok_b):
        differences.append(f"vocabulary size {len(tok_a)} vs {len(tok_b)}")
    for name in _SPECIAL_IDS:
        id_a, id_b = getattr(tok_a, name, None), getattr(tok_b, name, None)
        if id_a != id_b:
            differences.append(f"{name} {id_a} vs {id_b}")
    hash_a, hash_b = vocab_sha256(tok_a), vocab_sha256(tok_b)
    if hash_a != hash_b:
        vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
        only_a = sorted(set(vocab_a) - set(vocab_b))
        only_b = sorted(set(vocab_b) - set(vocab_a))
        moved = sorted(t for t in set(vocab_a) & set(vocab_b) if vocab_a[t] != vocab_b[t])
        parts = [f"{len(tokens)} tokens {label} (e.g. {', '.join(repr(t) for t in tokens[:3])})"
                 for tokens, label in ((only_a, f"only in {what_a}'s"), (only_b, f"only in {what_b}'s"),
                                       (moved, "with other ids")) if tokens]
        differences.append(f"vocabularies differ (sha256 {hash_a[:12]} vs {hash_b[:12]}): "
                           + "; ".join(parts))
    if differences:
        raise UserError(
            f"{what_a} ({where_a}) and {what_b} ({where_b}) use different tokenizers: "
            f"{'; '.join(differences)}. A model reads token ids, so ids from another vocabulary "
            "mean other tokens to it; fix: build every model of a run with one tokenizer (the "
            "reward stage starts from the SFT model and keeps its tokenizer), or point at the "
            "directories of one run"
        )


def _set_special_ids(config, tokenizer) -> None:
    """Pad/eos/bos ids from the tokenizer; HF pooling and generation read them from the config."""
    for name in _SPECIAL_IDS:
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(config, name, value)
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id


def _init_head(head: nn.Linear, std: float) -> None:
    if std > 0:
        nn.init.normal_(head.weight, std=std)
    else:
        nn.init.zeros_(head.weight)
    if head.bias is not None:
        nn.init.zeros_(head.bias)


def token_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T) float32 raw head output at every position (per-token values for a value model).

    `model` may be wrapped (peft, DDP): the forward goes through the wrapper.
    """
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    with capture_output(unwrap(model).score) as outputs:
        model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=False,
        )
    return outputs[-1].squeeze(-1).float()


def sequence_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    normalise: bool = True,
) -> torch.Tensor:
    """(B,) float32 score at the last real token of each row (left or right padding).

    With `normalise`, returns `reward_gain * raw + reward_bias` from the model's config.
    """
    scores = token_scores(model, input_ids, attention_mask, position_ids)
    rows = torch.arange(scores.shape[0], device=scores.device)
    raw = scores[rows, last_token_index(attention_mask)]
    if not normalise:
        return raw
    config = unwrap(model).config
    return getattr(config, "reward_gain", 1.0) * raw + getattr(config, "reward_bias", 0.0)


def set_reward_normalisation(model: nn.Module, raw_scores: torch.Tensor) -> tuple[float, float]:
    """Set config gain/bias so `raw_scores` map to mean 0, std 1 (biased std); returns them."""
    raw = raw_scores.detach().double().flatten()
    mean, std = raw.mean().item(), raw.std(unbiased=False).item()
    if not std > 1e-12:
        raise UserError(
            f"reward normalisation: all {raw.numel()} reference scores equal {mean:.6g}, so they "
            "cannot be scaled to std 1; fix: use a larger or more varied reference set, or train "
            "the reward model longer"
        )
    config = unwrap(model).config
    config.reward_gain = 1.0 / std
    config.reward_bias = -mean / std
    return config.reward_gain, config.reward_bias


@torch.no_grad()
def fold_reward_normalisation(model: nn.Module) -> nn.Module:
    """Fold a reward model's normalisation into its head; returns the model, changed in place.

    score(h) := gain * score(h) + bias, then gain, bias := 1, 0: the normalised scores
    (`sequence_scores`) are unchanged, and the raw head output (`token_scores`) now is on their
    scale. A value model initialised from the reward model reads the raw head, so unfolded its
    values start off the rewards' scale (by up to 0.5 on the arithmetic task). The head gets a
    bias, which `save_model` writes and `load_scalar_model` restores. Call before LoRA wrapping.
    """
    hf = unwrap(model)
    config = hf.config
    gain, bias = getattr(config, "reward_gain", 1.0), getattr(config, "reward_bias", 0.0)
    if not isinstance(hf.score, nn.Linear):
        raise TypeError(f"fold_reward_normalisation: the head is a {type(hf.score).__name__}, "
                        "not a linear layer; fold before wrapping the model with LoRA")
    head_bias = _add_score_bias(hf)
    hf.score.weight.mul_(gain)
    head_bias.mul_(gain).add_(bias)
    config.reward_gain, config.reward_bias = 1.0, 0.0
    return model


def _add_score_bias(model: PreTrainedModel) -> torch.Tensor:
    """The score head's bias, added as zeros when the head has none (HF's heads have none)."""
    head = model.score
    if head.bias is None:
        head.bias = nn.Parameter(torch.zeros(head.out_features, device=head.weight.device,
                                             dtype=head.weight.dtype),
                                 requires_grad=head.weight.requires_grad)
    return head.bias.data


def _saved_score_bias(path: Path) -> torch.Tensor | None:
    """The `score.bias` a folded head (`fold_reward_normalisation`) saved in `path`, else None."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            if "score.bias" in weights.keys():
                return weights.get_tensor("score.bias")
    return None


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Silence transformers' loading report (a logged warning) for one `from_pretrained`."""
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def save_model(
    model: nn.Module, tokenizer, out_dir: str | Path, extra_json: dict[str, Any] | None = None
) -> Path:
    """Write `model` (safetensors) and `tokenizer` to `out_dir` atomically; returns the path.

    A LoRA model is saved merged (a plain HF model: loadable without peft). `extra_json` maps file
    names (".json" added when missing) to objects written next to the weights.
    """
    if callable(getattr(model, "merge_and_unload", None)):
        model = copy.deepcopy(model).merge_and_unload()
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra_json or {}).items():
            filename = name if name.endswith(".json") else f"{name}.json"
            (tmp / filename).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (PPO convention), keeping the module's train/eval mode.

    Besides `nn.Dropout` modules, attention layers such as Llama's read a float attribute
    `attention_dropout` in train mode, and the config is updated so a saved copy agrees.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    config = getattr(unwrap(model), "config", None)
    for field in _DROPOUT_FIELDS:
        if isinstance(getattr(config, field, None), float):
            setattr(config, field, 0.0)
    return model


def _import_peft():
    try:
        import peft
    except ImportError as err:
        raise UserError(
            "LoRA needs the 'peft' package, which is not installed; fix: pip install ppo-rlhf[lora]"
        ) from err
    return peft


def default_lora_targets(model: nn.Module) -> list[str] | str:
    """Attention and MLP projections for GPT-2 / Llama-like models, else peft's "all-linear"."""
    return _LORA_TARGETS.get(unwrap(model).config.model_type, "all-linear")


def apply_lora(
    model: PreTrainedModel,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str | None = None,
) -> nn.Module:
    """Wrap `model` with LoRA adapters (only adapters, and a scalar model's head, train)."""
    peft = _import_peft()
    is_scalar = hasattr(model, "score")
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or default_lora_targets(model),
        task_type=peft.TaskType.SEQ_CLS if is_scalar else peft.TaskType.CAUSAL_LM,
        # GPT-2's projections are Conv1D, whose weight is stored transposed.
        fan_in_fan_out=model.config.model_type == "gpt2",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise UserError(
            f"LoRA: {err}; fix: set the LoRA target_modules to module names of this "
            f"{model.config.model_type} model"
        ) from err


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the LoRA model as its frozen base (the PPO reference policy without a second copy)."""
    if not callable(getattr(model, "disable_adapter", None)):
        raise TypeError(f"{type(model).__name__} has no LoRA adapters to disable")
    with model.disable_adapter():
        yield model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of (distinct; tied weights once) parameters, optionally only those with grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
