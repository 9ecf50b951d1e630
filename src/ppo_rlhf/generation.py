"""Fast sampling and scoring: the hot path of PPO rollouts.

    response_ids, response_mask = generate(policy, prompt_ids, prompt_mask, max_new_tokens=64,
                                           eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id, temperature=0.7)
    sequences = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    logprobs, _ = response_logprobs(policy, sequences, mask, prompt_ids.shape[1], temperature=0.7)

Layout (docs/CONTRIBUTING-INTERNAL.md): prompts (B, P) are left-padded, responses (B, R) start at
the first generated token and are right-padded after EOS; masks are True on real tokens; positions
are counted over real tokens only (cumsum - 1), which left-padded GPT-2 needs.

Why not `model.generate`: for the small models PPO is tested and demoed on, decoding is bound by
per-token framework overhead (logits processors, cache objects, mask rebuilding on every step),
not arithmetic. Here GPT-2 and Llama/Qwen2 models decode through a short forward of their own
(`_GPT2Decoder`, `_LlamaDecoder`) that calls the model's own submodules -- so LoRA adapters and
`adapters_disabled` still apply -- with a preallocated KV cache, a precomputed mask, the LM head on
the last position only and inverse-CDF sampling from one uniform per row. Other architectures
decode through the model's own forward with a KV cache (`_HFDecoder`). Tests check the fast paths
against `model.generate` (greedy) and against `response_logprobs`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedModel

from ppo_rlhf import precision
from ppo_rlhf.algo.losses import entropy_from_logits
from ppo_rlhf.data.collate import position_ids_from_mask
from ppo_rlhf.errors import UserError
from ppo_rlhf.models import capture_output, sequence_scores, token_scores, unwrap

# A chunk of the LM head's output is at most this many float32 logits (256 MiB).
_MAX_CHUNK_LOGITS = 64 * 1024 * 1024
# CPU decoding on an AMD CPU runs on one thread when batch x hidden size is at most this: each step
# is then small products and ~200 small ops, where waking a second OpenMP thread costs more than it
# saves. Generate phase of a PPO update, 2 threads -> 1 (quiet 2-core AMD EPYC, benchmarks/README.md):
# d=64 B=128 0.20 -> 0.10 s; d=256 B=32 0.36 -> 0.31 s; d=256 B=64 0.25 -> 0.24 s; but d=512 B=32
# 0.33 -> 0.42 s, so larger products keep every thread. On an Intel Xeon (MKL's own threading) the
# second thread pays at these sizes: `generate`, 2 threads against 1, interleaved in one process,
# quiet 2-core Xeon with AMX: d=128 B=64 21.8 vs 27.5 ms, d=64 B=128 157 vs 173 ms, d=64 B=32 73.4
# vs 79.6 ms, d=256 B=32 369 vs 398 ms, d=64 B=8 13.4 vs 13.2 ms; so only AMD CPUs drop to one.
_ONE_THREAD_DECODE = 8192


def one_thread_decode(device: torch.device, rows: int, hidden: int, vendor: str | None = None) -> bool:
    """Whether to decode on one CPU thread: an AMD CPU (`vendor`, default this machine's) and at
    most `_ONE_THREAD_DECODE` rows x hidden size."""
    if device.type != "cpu" or rows * hidden > _ONE_THREAD_DECODE:
        return False
    return (precision.cpu_vendor() if vendor is None else vendor) == "AuthenticAMD"


def _lm_parts(model: nn.Module) -> tuple[PreTrainedModel, nn.Module]:
    """The HF model inside `model` and its LM head, which must map hidden states to logits as is.

    Log-probs here apply the head to chosen hidden states; models that post-process logits
    (soft-capping, scaling) would silently get wrong log-probs, so they are refused.
    """
    hf = unwrap(model)
    for name in ("final_logit_softcapping", "logits_scaling", "logit_scale"):
        if getattr(hf.config, name, None) not in (None, 1, 1.0):
            raise UserError(
                f"{hf.config.model_type} models transform their logits ({name}="
                f"{getattr(hf.config, name)}), which generation and scoring here do not apply; "
                "fix: use a GPT-2, Llama, Qwen or Mistral-style model"
            )
    return hf, hf.get_output_embeddings()


def fp32_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(..., V) float32 logits: the LM head applied in float32 to float32 hidden states.

    Also under bf16 autocast: bf16 logits keep ~3 significant digits, which puts errors of up to
    ~0.04 nats into log-probs (and spreads PPO's first ratios over [0.96, 1.04]); casting bf16
    logits to float afterwards does not recover them. The head is one (N, D) x (D, V) product,
    a small part of a forward's arithmetic.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        if head.weight.dtype == torch.float32:
            return head(hidden.float())
        bias = None if getattr(head, "bias", None) is None else head.bias.float()
        return F.linear(hidden.float(), head.weight.float(), bias)


# ---------------------------------------------------------------------------------------------
# Sampling


def truncate_logits(
    logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, V) logits (already divided by the temperature) with the tokens that top-k / top-p
    sampling drops set to -inf: softmax of the result is the distribution actually sampled.

    Same order as HF: top-k (ties with the k-th logit stay), then top-p on the renormalised
    top-k distribution (the smallest set of most likely tokens whose probability reaches top_p;
    the most likely token always stays). The sampler (`generate`) and the training forward
    (`response_logprobs`) both call this, so stored and recomputed log-probs are of one
    distribution -- PPO's ratio is then on-policy. `keep` (N,) token ids stay whatever their
    rank: scoring passes the sampled tokens, which the sampler kept by construction, so a rounding
    difference at the cut between the decoder's and the training forward's logits cannot make a
    sampled token's log-prob -inf. Returns `logits` itself when neither filter is on. The kept
    set is a constant for autograd; gradients reach the kept logits.
    """
    use_top_k = 0 < top_k < logits.shape[-1]
    if not use_top_k and top_p >= 1.0:
        return logits
    with torch.no_grad():
        removed = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        if use_top_k:
            removed = logits < logits.topk(top_k, dim=-1).values[..., -1:]
        if top_p < 1.0:
            probs = torch.softmax(logits.masked_fill(removed, float("-inf")), dim=-1)
            probs, order = probs.sort(dim=-1, descending=True)
            cut = (probs.cumsum(-1) - probs) >= top_p  # the mass before a token already reaches top_p
            cut[..., 0] = False
            removed = removed | torch.zeros_like(cut).scatter(-1, order, cut)
        if keep is not None:
            removed.scatter_(-1, keep.view(-1, 1), False)
    return logits.masked_fill(removed, float("-inf"))


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) token ids drawn from (B, V) logits; temperature 0 is greedy (argmax).

    Draws from softmax(truncate_logits(logits / temperature, top_k, top_p)) by inverse CDF, one
    uniform per row, which is far cheaper than `torch.multinomial` or Gumbel noise over the
    whole vocabulary. `uniform` (B,) in [0, 1) supplies those draws instead of `generator` (see
    `row_uniforms`).
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = truncate_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(-1)
    # u in (0, total]: the first index with cdf >= u is never a zero-probability token.
    if uniform is None:
        uniform = torch.rand(
            probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype
        )
    else:
        uniform = uniform.to(cdf.dtype).view(-1, 1)
    choice = torch.searchsorted(cdf, (1.0 - uniform) * cdf[:, -1:]).squeeze(-1)
    return choice.clamp_(max=probs.shape[-1] - 1)


def row_uniforms(row_seeds: Sequence[int], n: int) -> torch.Tensor:
    """(B, n) float32 uniforms in [0, 1) on the CPU, row i from a generator seeded with row_seeds[i].

    Drawn up front, one generator per row per call (not per token), so per-row streams cost
    next to nothing; on the CPU so that a seed gives the same draws on every device.
    """
    out = torch.empty(len(row_seeds), n)
    for row, seed in enumerate(row_seeds):
        out[row] = torch.rand(n, generator=torch.Generator().manual_seed(int(seed) % 2**63))
    return out


# ---------------------------------------------------------------------------------------------
# Decoders: run the trunk over new tokens, keeping the KV cache. Each takes the full (B, P + R)
# attention mask at construction; `decoder(prompt_ids, 0)` then runs the prompt (prefill) and
# `decoder(token_ids, start)` one new token per row at position `start`. Both return the final
# hidden states (B, T, D).


class _Decoder:
    """Shared state: positions, masks and a preallocated KV cache of P + R slots per layer."""

    def __init__(self, trunk: nn.Module, full_mask: torch.Tensor, prompt_len: int):
        self.trunk = trunk
        self.positions = position_ids_from_mask(full_mask)
        self.max_len = full_mask.shape[1]
        key_mask = full_mask.bool()
        # Prefill: causal and not padding; a padding query also sees itself, so that no softmax
        # row is empty (an all-masked row gives NaN that would reach real tokens through V).
        arange = torch.arange(prompt_len, device=full_mask.device)
        causal = arange[None, :] <= arange[:, None]
        self.prefill_mask = (causal & key_mask[:, None, :prompt_len]) | torch.eye(
            prompt_len, dtype=torch.bool, device=full_mask.device
        )
        self.prefill_mask = self.prefill_mask[:, None]  # (B, 1, P, P)
        # Decoding: a new token sees the real prompt tokens and every generated token (tokens
        # after a row's EOS only feed that row's own discarded continuation).
        self.step_mask = key_mask[:, None, None, :]  # (B, 1, 1, P + R)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def expand(self, n: int) -> None:
        """After the prefill, make each row n consecutive rows (row i -> rows i*n .. i*n+n-1):
        the prompt's cached keys/values are copied, not recomputed."""
        self.positions = self.positions.repeat_interleave(n, dim=0)
        self.prefill_mask = self.prefill_mask.repeat_interleave(n, dim=0)
        self.step_mask = self.step_mask.repeat_interleave(n, dim=0)
        prompt_len = self.prefill_mask.shape[-1]

        def copy_prompt(cache: torch.Tensor) -> torch.Tensor:
            # Only the prompt's slots hold anything yet: copying the whole P + R buffer cost more
            # than the prefill it saves at short prompts (tiny-gpt2, 16+64: CPU time x0.89).
            out = cache.new_empty((cache.shape[0] * n, *cache.shape[1:]))
            out[:, :, :prompt_len] = cache[:, :, :prompt_len].repeat_interleave(n, dim=0)
            return out

        self.keys = [copy_prompt(k) for k in self.keys]
        self.values = [copy_prompt(v) for v in self.values]

    def mask(self, start: int) -> torch.Tensor:
        """Boolean attention mask: (B, 1, P, P) for the prefill, (B, 1, 1, start + 1) for a step."""
        return self.prefill_mask if start == 0 else self.step_mask[..., : start + 1]

    def cache(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store (B, Hkv, T, hd) keys/values at [start, start + T); return all so far."""
        if layer == len(self.keys):  # first call: allocate with the dtype autocast produced
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys.append(k.new_empty(shape))
            self.values.append(v.new_empty(shape))
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def _attend(q, k, v, mask, scale):
    """Causal attention with grouped KV heads: q (B, H, T, hd), k/v (B, Hkv, L, hd).

    Grouped queries are folded into the query-length axis, so K/V are never repeated (nor is a
    one-token step's mask: its single query row broadcasts).
    """
    batch, heads, length, head_dim = q.shape
    groups = heads // k.shape[1]
    if groups > 1:
        q = q.reshape(batch, k.shape[1], groups * length, head_dim)
        if length > 1:
            mask = mask.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, length, head_dim)


class _GPT2Decoder(_Decoder):
    """GPT-2 (`GPT2Model`): learned positions, pre-LayerNorm blocks, fused QKV projection."""

    def __init__(self, trunk: nn.Module, full_mask: torch.Tensor, prompt_len: int):
        super().__init__(trunk, full_mask, prompt_len)
        # Submodules looked up once: nn.Module attribute access and wrapper calls cost as much as
        # these tiny ops (~7% of a step at batch 8). The MLP is unrolled without its dropout,
        # which is off while sampling.
        self.blocks = [
            (b.ln_1, b.attn.c_attn, b.attn.scaling, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.act,
             b.mlp.c_proj)
            for b in trunk.h
        ]
        self.head_dim, self.split_size = trunk.h[0].attn.head_dim, trunk.h[0].attn.split_size

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        trunk, (batch, length) = self.trunk, ids.shape
        hidden = trunk.wte(ids) + trunk.wpe(self.positions[:, start : start + length])
        mask = self.mask(start)
        for i, (ln_1, c_attn, scaling, attn_proj, ln_2, c_fc, act, mlp_proj) in enumerate(
            self.blocks
        ):
            q, k, v = c_attn(ln_1(hidden)).split(self.split_size, dim=2)
            q, k, v = (x.view(batch, length, -1, self.head_dim).transpose(1, 2) for x in (q, k, v))
            k, v = self.cache(i, start, k, v)
            out = _attend(q, k, v, mask, scaling).transpose(1, 2).reshape(batch, length, -1)
            hidden = hidden + attn_proj(out)
            hidden = hidden + mlp_proj(act(c_fc(ln_2(hidden))))
        return trunk.ln_f(hidden)


class _LlamaDecoder(_Decoder):
    """Llama / Qwen2 (`LlamaModel`-shaped): rotary positions, RMSNorm, grouped KV heads."""

    def __init__(self, trunk: nn.Module, full_mask: torch.Tensor, prompt_len: int):
        super().__init__(trunk, full_mask, prompt_len)
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        # Submodules looked up once (see _GPT2Decoder).
        self.layers = [
            (layer.input_layernorm, layer.self_attn.q_proj, layer.self_attn.k_proj,
             layer.self_attn.v_proj, layer.self_attn.scaling, layer.self_attn.o_proj,
             layer.post_attention_layernorm, layer.mlp)
            for layer in trunk.layers
        ]
        self.head_dim = trunk.layers[0].self_attn.head_dim

    def expand(self, n: int) -> None:
        super().expand(n)
        if self.rope is not None:
            self.rope = tuple(x.repeat_interleave(n, dim=0) for x in self.rope)

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        trunk, (batch, length) = self.trunk, ids.shape
        hidden = trunk.embed_tokens(ids)
        if self.rope is None:  # cos/sin of every position once, (B, 1, P + R, hd)
            cos, sin = trunk.rotary_emb(hidden, self.positions)
            # HF's rotate_half(x) * sin == x.roll(hd / 2) * sin with its first half negated.
            half = sin.shape[-1] // 2
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            self.rope = cos[:, None], sin[:, None]
        cos, sin = (x[:, :, start : start + length] for x in self.rope)
        half = cos.shape[-1] // 2
        mask = self.mask(start)
        for i, (norm_1, q_proj, k_proj, v_proj, scaling, o_proj, norm_2, mlp) in enumerate(
            self.layers
        ):
            x = _rms_norm(norm_1, hidden)
            q, k, v = (
                proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
                for proj in (q_proj, k_proj, v_proj)
            )
            q = q * cos + q.roll(half, dims=-1) * sin
            k = k * cos + k.roll(half, dims=-1) * sin
            k, v = self.cache(i, start, k, v)
            out = _attend(q, k, v, mask, scaling).transpose(1, 2).reshape(batch, length, -1)
            hidden = hidden + o_proj(out)
            hidden = hidden + mlp(_rms_norm(norm_2, hidden))
        return _rms_norm(trunk.norm, hidden)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF's Llama/Qwen2 RMSNorm (float32 statistics, weight applied in the input dtype) in two
    kernels instead of its seven small ops."""
    normed = F.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def cache_keyword(forward) -> str:
    """The keyword a model's `forward` takes its KV cache by: `cache` from transformers 5.24,
    `past_key_values` before it.

    Passing the wrong one fails silently: the forward's `**kwargs` swallows it, and every decoding
    step after the prompt then runs without context. So the signature decides (decorators keep it
    through `functools.wraps`).
    """
    parameters = inspect.signature(forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise UserError(
        f"{type(getattr(forward, '__self__', forward)).__name__}.forward takes no KV cache (neither "
        "`cache` nor `past_key_values`), so it cannot be sampled from incrementally; fix: use a "
        "decoder-only causal LM (GPT-2, Llama, Qwen, Mistral, Gemma, Phi)"
    )


class _HFDecoder:
    """Any other architecture: the trunk's own forward with a `DynamicCache` and 2-D mask."""

    def __init__(self, trunk: nn.Module, full_mask: torch.Tensor, prompt_len: int):
        self.trunk, self.full_mask, self.prompt_len = trunk, full_mask, prompt_len
        self.positions = position_ids_from_mask(full_mask)
        self.kv_cache = DynamicCache(config=trunk.config)
        self.cache_keyword = cache_keyword(trunk.forward)

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        end = start + ids.shape[1]
        hidden = self.trunk(
            input_ids=ids,
            attention_mask=self.full_mask[:, :end],
            position_ids=self.positions[:, start:end],
            use_cache=True,
            **{self.cache_keyword: self.kv_cache},
        ).last_hidden_state
        if start == 0 and self.kv_cache.get_seq_length() != self.prompt_len:
            # The forward did not use our cache: the steps would run without the prompt.
            raise RuntimeError(
                f"generate: after the {self.prompt_len}-token prompt the KV cache passed to "
                f"{type(self.trunk).__name__}.forward as `{self.cache_keyword}=` holds "
                f"{self.kv_cache.get_seq_length()} positions, not {self.prompt_len}: this "
                "transformers version passes the cache some other way; fix: install a "
                "transformers version that pyproject.toml declares, and report this"
            )
        return hidden

    def expand(self, n: int) -> None:
        """After the prefill, make each row n consecutive rows (see `_Decoder.expand`)."""
        self.full_mask = self.full_mask.repeat_interleave(n, dim=0)
        self.positions = self.positions.repeat_interleave(n, dim=0)
        self.kv_cache.batch_repeat_interleave(n)


def _check_context(trunk: nn.Module, full_mask: torch.Tensor, prompt_len: int) -> None:
    """Learned absolute positions (GPT-2's `wpe`) end at the context length: refuse to go past it."""
    wpe = getattr(trunk, "wpe", None)
    if wpe is None:
        return
    longest, context = int(full_mask.sum(-1).max()), wpe.num_embeddings
    if longest > context:
        new_tokens = full_mask.shape[1] - prompt_len
        raise UserError(
            f"generate: the longest prompt plus max_new_tokens={new_tokens} is {longest} "
            f"tokens, more than the model's {context}-token context; fix: lower "
            "max_new_tokens or the maximum prompt length"
        )


def _decoder_class(trunk: nn.Module) -> type:
    """The fast decoder for architectures whose forward it reproduces, else `_HFDecoder`."""
    model_type = trunk.config.model_type
    if model_type == "gpt2":
        # Early transformers 5 releases (5.0 among them) have no GPT2Attention.scaling, the fast
        # path's softmax scale: those decode through the model's own forward.
        plain = not trunk.config.add_cross_attention and hasattr(trunk.h[0].attn, "scaling")
        return _GPT2Decoder if plain else _HFDecoder
    if model_type not in ("llama", "qwen2"):
        return _HFDecoder
    full_attention = all(
        getattr(layer.self_attn, "sliding_window", None) is None for layer in trunk.layers
    )
    # Rotary tables computed once for all positions: not for length-dependent ("dynamic") RoPE.
    rope_type = getattr(trunk.rotary_emb, "rope_type", "default")
    static_rope = rope_type in ("default", "linear", "llama3")
    return _LlamaDecoder if full_attention and static_rope else _HFDecoder


# ---------------------------------------------------------------------------------------------
# Generation


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device) -> torch.Tensor:
    """The stop ids as a 1-D tensor (empty: never stop early)."""
    if eos_token_id is None:
        eos_token_id = []
    elif isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    return torch.tensor(list(eos_token_id), dtype=torch.long, device=device)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    row_seeds: Sequence[int] | None = None,
    return_logprobs: bool = False,
    return_entropy: bool = False,
    num_samples: int = 1,
):
    """Sample responses to left-padded prompts with a KV cache.

    input_ids, attention_mask: (B, P) left-padded prompts. Returns `(response_ids, response_mask)`,
    both (B, R): a row keeps its EOS (mask True) and is then padded with `pad_token_id` (mask
    False); R is the longest response (decoding stops once every row has produced EOS). With
    `return_logprobs`, also returns (B, R) float32 log-probs of the sampled tokens under the
    distribution sampled, log_softmax(truncate_logits(logits / temperature, top_k, top_p))
    (temperature 1 when greedy), 0 where the mask is False; with `return_entropy`, then (B, R)
    float32 entropies of that same distribution, 0 likewise. `response_logprobs` with the same
    temperature, top_k and top_p computes the same.

    Deterministic given `generator` (on the model's device). With `row_seeds` (one int per row)
    each row draws from its own stream instead (`row_uniforms`), so a row's sample does not depend
    on which other rows share its batch -- the same prompts give the same responses whether they
    are generated in one process or sharded over DDP ranks. Dropout is off while sampling.

    With `num_samples` = n > 1 (group rollouts: GRPO, RLOO), every output has B * n rows, prompt i's
    samples in rows i*n .. i*n+n-1 (the order of `input_ids.repeat_interleave(n, 0)`), and
    `row_seeds` needs B * n seeds. Each prompt runs through the model once: its KV cache is
    computed on B rows and then copied to its n rows. The result is that of generating the
    repeated prompts (to float rounding).
    """
    hf, head = _lm_parts(model)
    trunk = hf.base_model
    batch, prompt_len = input_ids.shape
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    rows = batch * num_samples
    device = input_ids.device
    full_mask = torch.cat(
        [attention_mask.bool(), attention_mask.new_ones(batch, max_new_tokens, dtype=torch.bool)], 1
    )
    _check_context(trunk, full_mask, prompt_len)
    decoder = _decoder_class(trunk)(trunk, full_mask, prompt_len)
    eos = _eos_tensor(eos_token_id, device)
    response = torch.empty(rows, max_new_tokens, dtype=torch.long, device=device)
    logprobs = torch.empty(rows, max_new_tokens, device=device) if return_logprobs else None
    entropy = torch.empty(rows, max_new_tokens, device=device) if return_entropy else None
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    uniforms = None
    if row_seeds is not None and temperature != 0:
        if len(row_seeds) != rows:
            raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {rows} rows "
                             f"({batch} prompts x num_samples={num_samples})")
        uniforms = row_uniforms(row_seeds, max_new_tokens).to(device)
    # A CPU sync is free; on an accelerator it would stall the queued kernels, so check rarely.
    check_every = 1 if device.type == "cpu" else 8

    modes = [(module, module.training) for module in hf.modules()]
    hf.eval()
    threads = torch.get_num_threads()
    if one_thread_decode(device, rows, head.weight.shape[1]):
        torch.set_num_threads(1)
    try:
        steps = 0
        hidden = decoder(input_ids, 0)[:, -1:]
        if num_samples > 1:
            decoder.expand(num_samples)
            hidden = hidden.repeat_interleave(num_samples, dim=0)
        while steps < max_new_tokens:
            # The distribution sampled, whose log-probs are stored: truncated, renormalised.
            scaled = truncate_logits(
                fp32_logits(head, hidden[:, -1]) / (temperature or 1.0), top_k=top_k, top_p=top_p
            )
            token = sample_tokens(
                scaled, temperature=0 if temperature == 0 else 1.0, generator=generator,
                uniform=None if uniforms is None else uniforms[:, steps],
            )
            response[:, steps] = token
            if logprobs is not None or entropy is not None:
                logsumexp = scaled.logsumexp(-1)
            if logprobs is not None:
                logprobs[:, steps] = scaled.gather(-1, token[:, None]).squeeze(-1) - logsumexp
            if entropy is not None:
                entropy[:, steps] = entropy_from_logits(scaled)
            finished |= (token[:, None] == eos).any(-1)
            steps += 1
            if steps == max_new_tokens or (steps % check_every == 0 and bool(finished.all())):
                break
            hidden = decoder(token[:, None], prompt_len + steps - 1)
    finally:
        torch.set_num_threads(threads)
        for module, training in modes:
            module.training = training

    # Rows keep their first EOS; what they sampled after it becomes padding.
    is_eos = (response[:, :steps, None] == eos).any(-1)
    response_mask = (is_eos.cumsum(-1) - is_eos.long()) == 0
    length = int(response_mask.sum(-1).max()) if rows else 0
    response_mask = response_mask[:, :length]
    response = response[:, :length].masked_fill(~response_mask, pad_token_id)
    extras = [t[:, :length].masked_fill(~response_mask, 0.0) for t in (logprobs, entropy) if t is not None]
    return (response, response_mask, *extras)


# ---------------------------------------------------------------------------------------------
# Scoring


def _token_logprobs(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
    with_entropy: bool, top_k: int = 0, top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) log-probs of `targets` and (N,) entropies (empty unless asked) from (N, D) states."""
    logits = truncate_logits(
        fp32_logits(head, hidden) / temperature, top_k=top_k, top_p=top_p, keep=targets
    )
    logsumexp = logits.logsumexp(-1)
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - logsumexp
    if not with_entropy:
        return logprobs, logprobs.new_zeros(0)
    return logprobs, entropy_from_logits(logits)


def response_logprobs(
    model: nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the response tokens under
    log_softmax(truncate_logits(logits / temperature, top_k, top_p)), the distribution `generate`
    samples from with the same settings (top_k 0 and top_p 1: the full softmax).

    sequences, attention_mask: (B, P + R), prompt left-padded, response right-padded.
    Returns (B, R) float32 log-probs and, with `with_entropy`, (B, R) entropies; both 0 where the
    response mask is False. One forward of `model` (plain, peft or DDP-wrapped); the LM head
    then runs only on the hidden states that predict real response tokens, `chunk_size` of them
    at a time (default: as many as fit in 256 MiB of float32 logits), so no (B, R, V) float32
    tensor is built. Differentiable: with several chunks under autograd each chunk's logits are
    recomputed in backward (checkpoint) rather than kept.
    """
    hf, head = _lm_parts(model)
    # Through the wrapper (DDP must see the forward); the logits of only one position are made.
    with capture_output(hf.base_model) as outputs:
        model(
            input_ids=sequences, attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask), use_cache=False, logits_to_keep=1,
        )
    hidden = outputs[-1].last_hidden_state
    response_mask = attention_mask[:, prompt_len:].bool()
    states = hidden[:, prompt_len - 1 : -1][response_mask]  # (N, D), N real response tokens
    targets = sequences[:, prompt_len:][response_mask]
    if chunk_size is None:  # top-p sorts each chunk: its indices and probabilities take 3x more
        chunk_size = max(1, _MAX_CHUNK_LOGITS // head.weight.shape[0] // (4 if top_p < 1 else 1))
    chunks = []
    use_checkpoint = torch.is_grad_enabled() and states.shape[0] > chunk_size
    for start in range(0, states.shape[0], chunk_size):
        end = start + chunk_size
        args = (head, states[start:end], targets[start:end], temperature, with_entropy, top_k, top_p)
        if use_checkpoint:
            chunks.append(checkpoint(_token_logprobs, *args, use_reentrant=False))
        else:
            chunks.append(_token_logprobs(*args))
    logprobs = _scatter(response_mask, [c[0] for c in chunks])
    entropy = _scatter(response_mask, [c[1] for c in chunks]) if with_entropy else None
    return logprobs, entropy


def _scatter(mask: torch.Tensor, chunks: list[torch.Tensor]) -> torch.Tensor:
    """(B, R) float32 tensor holding the concatenated chunks at the True places of `mask`."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return out.masked_scatter(mask, torch.cat(chunks)) if chunks else out


def response_values(
    value_model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int
) -> torch.Tensor:
    """(B, R) float32 values V(s_t) of the state before each response token; 0 past the mask.

    Position P - 1 + t holds the state that response token t is sampled from.
    """
    values = token_scores(value_model, sequences, attention_mask, position_ids_from_mask(attention_mask))
    return values[:, prompt_len - 1 : -1].masked_fill(~attention_mask[:, prompt_len:].bool(), 0.0)


def sequence_rewards(
    reward_model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B,) float32 normalised reward-model score at the last real token of each sequence."""
    return sequence_scores(reward_model, sequences, attention_mask, position_ids_from_mask(attention_mask))
