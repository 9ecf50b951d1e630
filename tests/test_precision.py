"""bf16 mixed precision: run.dtype resolution, CPU autocast, float32 LM-head logits, float32
master weights and optimizer state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_tokenizer import make_tokenizer

from ppo_rlhf import generation, precision
from ppo_rlhf.config import OptimConfig, RunConfig
from ppo_rlhf.generation import fp32_logits, generate, response_logprobs
from ppo_rlhf.models import capture_output, load_causal_lm
from ppo_rlhf.stages import common

TOK = make_tokenizer()
CPU = torch.device("cpu")
ZEN5 = frozenset("fpu sse avx2 avx512f avx512bw avx512_bf16 avx512_vnni".split())
SAPPHIRE_RAPIDS = frozenset("avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8".split())
ZEN3 = frozenset("fpu sse avx avx2 fma".split())


@pytest.mark.parametrize("flags, expected, named", [
    (ZEN5, "bfloat16", "avx512_bf16"),
    (SAPPHIRE_RAPIDS, "bfloat16", "amx_bf16+avx512_bf16"),
    (frozenset({"amx_bf16"}), "bfloat16", "amx_bf16"),
    (ZEN3, "float32", "no native bf16"),
    (frozenset(), "float32", "no native bf16"),
])
def test_auto_picks_bf16_only_on_cpus_with_native_bf16_products(flags, expected, named):
    dtype, reason = precision.cpu_dtype_choice("Test CPU 9000", flags)
    assert dtype == expected
    assert "Test CPU 9000" in reason and named in reason


def test_avx512_without_bf16_is_float32():
    assert precision.cpu_dtype_choice("Xeon Skylake", {"avx512f", "avx512bw", "avx512vl"})[0] == "float32"


@pytest.mark.parametrize("flags, hidden, work, expected", [
    (SAPPHIRE_RAPIDS, 64, "train", "float32"), (SAPPHIRE_RAPIDS, 128, "train", "bfloat16"),
    (SAPPHIRE_RAPIDS, 128, "rl", "float32"), (SAPPHIRE_RAPIDS, 256, "rl", "bfloat16"),
    (SAPPHIRE_RAPIDS, None, "rl", "bfloat16"),
    (ZEN5, 128, "train", "float32"), (ZEN5, 128, "rl", "float32"), (ZEN5, 256, "train", "bfloat16"),
    (ZEN5, 896, "rl", "bfloat16"), (ZEN3, 896, "train", "float32"),
])
def test_auto_weighs_the_model_width_by_cpu_kind_and_work(flags, hidden, work, expected):
    """bf16 only from the width where it measured faster on that kind for that work: with AMX,
    training steps from 128 and RL iterations from 256; with AVX512-BF16 alone, 256 for both.
    The reason says which."""
    dtype, reason = precision.cpu_dtype_choice("Test CPU", flags, hidden, work)
    assert dtype == expected
    if hidden is not None and flags != ZEN3:
        assert f"{hidden}" in reason
        assert ("training steps" if work == "train" else "RL iterations") in reason


def test_auto_rejects_an_unknown_kind_of_work():
    with pytest.raises(ValueError, match="work='sampling'"):
        precision.cpu_dtype_choice("Test CPU", SAPPHIRE_RAPIDS, 128, "sampling")


def test_stages_resolve_auto_for_the_model_they_train(monkeypatch, tmp_path):
    """common.compute_dtype reads the width from a preset, a size spec or a saved directory."""
    from ppo_rlhf.models import hidden_size, save_model

    monkeypatch.setattr(precision, "cpu_info", lambda: ("New CPU", ZEN5))
    auto = RunConfig(dtype="auto")
    assert hidden_size("tiny-gpt2") == 128 and hidden_size("small-gpt2") == 256
    assert hidden_size("llama:layers=2,hidden=64,heads=4") == 64
    assert common.compute_dtype(auto, CPU, "tiny-gpt2") == "float32"
    assert common.compute_dtype(auto, CPU, "small-gpt2") == "bfloat16"
    assert common.compute_dtype(RunConfig(dtype="bfloat16"), CPU, "tiny-gpt2") == "bfloat16"
    monkeypatch.setattr(precision, "cpu_info", lambda: ("AMX CPU", SAPPHIRE_RAPIDS))
    assert common.compute_dtype(auto, CPU, "tiny-gpt2") == "bfloat16"  # SFT, RM, DPO
    assert common.compute_dtype(auto, CPU, "tiny-gpt2", work="rl") == "float32"
    monkeypatch.setattr(precision, "cpu_info", lambda: ("New CPU", ZEN5))
    save_model(load_causal_lm("gpt2:layers=1,hidden=256,heads=4", TOK), TOK, tmp_path / "m")
    assert hidden_size(tmp_path / "m") == 256
    assert common.compute_dtype(auto, CPU, str(tmp_path / "m")) == "bfloat16"
    assert hidden_size(tmp_path / "missing") is None


def test_explicit_dtype_is_kept_and_auto_reads_the_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_info", lambda: ("Old CPU", ZEN3))
    assert precision.resolve_dtype(RunConfig(dtype="bfloat16"), CPU) == "bfloat16"
    assert precision.resolve_dtype(RunConfig(dtype="float32"), CPU) == "float32"
    assert precision.resolve_dtype(RunConfig(dtype="auto"), CPU) == "float32"
    monkeypatch.setattr(precision, "cpu_info", lambda: ("New CPU", ZEN5))
    assert precision.resolve_dtype(RunConfig(dtype="auto"), CPU) == "bfloat16"
    assert precision.dtype_choice("auto", torch.device("meta"))[0] == "float32"


def test_precision_is_a_leaf_module_that_distributed_and_the_stages_share():
    """distributed.py and stages/common.py import precision.py, not each other."""
    import ast
    from pathlib import Path

    src = Path(precision.__file__).parent

    def imports(path):
        tree = ast.parse(path.read_text())
        return {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert imports(src / "precision.py") <= {"__future__", "pathlib", "typing", ".config"}  # .config: types only
    assert not any("stages" in m for m in imports(src / "distributed.py"))
    assert ".precision" in imports(src / "distributed.py") and "..precision" in imports(src / "stages" / "common.py")


def test_cpu_info_reads_model_and_flags():
    model, flags = precision.cpu_info()
    assert isinstance(model, str) and isinstance(flags, frozenset)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if "flags" in text:
        assert flags and all(" " not in f for f in flags)


def test_setup_prints_the_stage_and_its_precision(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_info", lambda: ("New CPU", ZEN5))
    threads = torch.get_num_threads()
    try:
        common.setup(RunConfig(dtype="auto", device="cpu", threads=1), stage="sft")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "[sft] precision: bfloat16 (auto: the CPU (New CPU) has avx512_bf16)" in out


def test_the_default_is_auto_and_the_rl_stage_weighs_its_own_work(monkeypatch, capsys):
    """run.dtype defaults to auto; on an AMX CPU a d=128 model trains SFT/RM steps in bf16 but
    runs the RL stage in float32 (benchmarks/train_steps_ab.py, interleaved_ab.py), and the RL
    stage's setup line says why."""
    assert RunConfig().dtype == "auto"
    monkeypatch.setattr(precision, "cpu_info", lambda: ("AMX CPU", SAPPHIRE_RAPIDS))
    threads = torch.get_num_threads()
    try:
        common.setup(RunConfig(device="cpu", threads=1), stage="sft", model="tiny-gpt2")
        common.setup(RunConfig(device="cpu", threads=1), stage="ppo", model="tiny-gpt2", work="rl")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "[sft] precision: bfloat16" in out and "training steps measured faster from hidden size 128" in out
    assert "[ppo] precision: float32" in out and "RL iterations measured no faster" in out


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float32", torch.float32),
                                             ("auto", torch.bfloat16)])
def test_autocast_runs_cpu_matmuls_in_bf16_when_asked(dtype, expected, monkeypatch):
    monkeypatch.setattr(precision, "cpu_info", lambda: ("New CPU", ZEN5))
    layer = torch.nn.Linear(8, 4)
    with precision.autocast(CPU, dtype):
        out = layer(torch.randn(2, 8))
    assert out.dtype == expected
    assert layer.weight.dtype == torch.float32


def test_fp32_logits_are_float32_products_under_autocast():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False)
    hidden = torch.randn(40, 64) * 3
    exact = hidden.double() @ head.weight.double().t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fp32_logits(head, hidden)
        bf16_then_float = head(hidden).float()  # what the code did before
    assert ours.dtype == torch.float32
    assert (ours.double() - exact).abs().max() < 1e-4
    assert (bf16_then_float.double() - exact).abs().max() > 1e-2  # the error this avoids


def test_fp32_logits_of_a_bf16_head():
    head = torch.nn.Linear(16, 10).to(torch.bfloat16)
    hidden = torch.randn(3, 16)
    expected = F.linear(hidden, head.weight.float(), head.bias.float())
    torch.testing.assert_close(fp32_logits(head, hidden), expected)


def batch(policy, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(TOK), (6, 7), generator=gen)
    mask = torch.arange(7)[None, :] >= torch.tensor([0, 2, 4, 6, 1, 3])[:, None]
    return ids.masked_fill(~mask, TOK.pad_token_id), mask


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_bf16_response_logprobs_take_the_head_in_float32(preset):
    """Under bf16 autocast the trunk runs in bf16 but log-probs are those of float64 arithmetic
    from its final hidden states (not of a bf16 head)."""
    policy = load_causal_lm(preset, TOK, seed=0).eval()
    ids, mask = batch(policy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        response, response_mask = generate(policy, ids, mask, max_new_tokens=6, eos_token_id=None,
                                           pad_token_id=TOK.pad_token_id, temperature=0.7,
                                           row_seeds=list(range(6)))
        sequences, full_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)
        with capture_output(policy.base_model) as outputs:
            logprobs, _ = response_logprobs(policy, sequences, full_mask, 7, temperature=0.7)
    hidden = outputs[-1].last_hidden_state[:, 6:-1]
    logits = hidden.double() @ policy.get_output_embeddings().weight.double().t() / 0.7
    expected = logits.log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)
    expected = expected.masked_fill(~response_mask, 0.0)
    assert logprobs.dtype == torch.float32
    assert (logprobs.double() - expected).abs().max() < 1e-4


def test_the_sampler_takes_the_head_in_float32_under_autocast(monkeypatch):
    policy = load_causal_lm("tiny-llama", TOK, seed=0).eval()
    ids, mask = batch(policy)
    seen = []
    real = generation.fp32_logits

    def recording(head, hidden):
        out = real(head, hidden)
        seen.append((hidden.detach().clone(), out))
        return out

    monkeypatch.setattr(generation, "fp32_logits", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate(policy, ids, mask, max_new_tokens=4, eos_token_id=None,
                 pad_token_id=TOK.pad_token_id, temperature=0.7, row_seeds=list(range(6)))
    assert len(seen) == 4
    weight = policy.get_output_embeddings().weight.double()
    for hidden, logits in seen:
        assert logits.dtype == torch.float32
        assert (logits.double() - hidden.double() @ weight.t()).abs().max() < 1e-4


def test_training_under_bf16_autocast_keeps_float32_weights_grads_and_adam_state():
    model = load_causal_lm("tiny-gpt2", TOK, seed=0)
    opt = common.make_optimizer(model.parameters(), OptimConfig(lr=1e-3))
    ids, mask = batch(model)
    with precision.autocast(CPU, "bfloat16"):
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16  # the trunk and head really ran in bf16
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    for p in model.parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
    state = opt.state[next(model.parameters())]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32


# -- the RL trainer in bf16: old log-probs from the training forward ------------------------------
@pytest.fixture(scope="module")
def rl_dirs(tmp_path_factory):
    import json
    import random

    from ppo_rlhf.models import load_scalar_model, save_model
    from ppo_rlhf.tasks import get_task
    from ppo_rlhf.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("rl_bf16")
    task = get_task("arithmetic")
    tok = train_tokenizer(task.tokenizer_corpus(random.Random(0)), 320)
    policy = load_causal_lm("small-gpt2", tok, seed=0)
    with torch.no_grad():  # a peaked policy, as after SFT: random init samples near-uniformly
        policy.get_output_embeddings().weight.mul_(3)
    save_model(policy, tok, root / "sft")
    rm = load_scalar_model(str(root / "sft"), tok, init_from_causal_lm=True, head_init_std=0.02, seed=1)
    save_model(rm, tok, root / "rm")
    prompts = task.sample_prompts(16, random.Random(0))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return root


def test_bf16_first_minibatch_ratios_are_one(rl_dirs, monkeypatch):
    """In bf16 the sampler's incremental decoder and the training forward round differently; the
    trainer recomputes the old log-probs with the training forward, so before any optimizer step
    every ratio is 1 (|ratio - 1| <= 1e-3), not spread over [0.96, 1.04]."""
    from ppo_rlhf.config import PPOConfig, build_config
    from ppo_rlhf.guards import NonFiniteGuard
    from ppo_rlhf.stages import rl
    from ppo_rlhf.stages.loop import StepContext

    cfg = build_config(PPOConfig, overrides=[
        f"policy={rl_dirs / 'sft'}", f"reward_model={rl_dirs / 'rm'}", f"prompts_file={rl_dirs / 'prompts.jsonl'}",
        f"out_dir={rl_dirs / 'out'}", "rollout.batch_size=16", "rollout.max_new_tokens=12",
        "rollout.temperature=0.7", "run.tensorboard=false", "run.dtype=bfloat16", "train.ppo_epochs=1",
        "train.num_minibatches=1"])
    torch.manual_seed(0)
    trainer = rl.RLTrainer(cfg, CPU)
    assert trainer.dtype == "bfloat16"

    sampler_gaps = []
    real_sample = rl.sample

    def sample_and_compare(policy, prompt_ids, prompt_mask, *args, **kwargs):
        ro = real_sample(policy, prompt_ids, prompt_mask, *args, **kwargs)
        sequences = torch.cat([ro.prompt_ids, ro.response_ids], 1)
        mask = torch.cat([ro.prompt_mask, ro.response_mask], 1)
        forward, _ = response_logprobs(policy, sequences, mask, ro.prompt_ids.shape[1], temperature=0.7)
        sampler_gaps.append((ro.logprobs - forward)[ro.response_mask].abs().max().item())
        return ro

    first = []
    real_loss = trainer.policy_loss

    def recording(logprobs, old_logprobs, advantages, mask, params):
        out = real_loss.fn(logprobs, old_logprobs, advantages, mask, params)
        if not first:
            first.append((out.ratio.detach(), mask))
        return out

    monkeypatch.setattr(rl, "sample", sample_and_compare)
    trainer.policy_loss = real_loss._replace(fn=recording)
    trainer.step(StepContext(1, NonFiniteGuard(5), None))
    ratio, mask = first[0]
    assert mask.any()
    assert (ratio[mask] - 1).abs().max().item() <= 1e-3
    # What the recomputation corrects: the sampler's own bf16 log-probs are further off.
    assert sampler_gaps and max(sampler_gaps) > 1e-3


@pytest.mark.parametrize("supported, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_cuda_follows_the_devices_bf16_support(supported, expected, monkeypatch):
    """The CUDA branch of the choice, without a GPU: the device's name and bf16 support decide."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    dtype, reason = precision.dtype_choice("auto", torch.device("cuda", 0))
    assert dtype == expected and "Test GPU" in reason
    assert precision.dtype_choice("float32", torch.device("cuda", 0))[0] == "float32"


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_hf_attention_runs_in_float32_under_cpu_bf16_autocast(preset, monkeypatch):
    """torch's CPU flash attention is slow in bf16 (its backward ~4.5x float32's), so the models'
    `sdpa` attention computes in float32 under bf16 autocast (models.install_cpu_bf16_attention);
    outputs and grads are those of the same attention run on the upcast bf16 q/k/v."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, *args, **kwargs)

    policy = load_causal_lm(preset, TOK, seed=0)
    ids, mask = batch(policy)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = policy(input_ids=ids, attention_mask=mask.long()).logits
    logits.float().sum().backward()
    assert seen and all(dtype == torch.float32 and not autocast for dtype, autocast in seen), seen
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.parameters() if p.requires_grad)
    seen.clear()
    with torch.no_grad():  # float32 calls are untouched
        policy(input_ids=ids, attention_mask=mask.long())
    assert seen and all(dtype == torch.float32 for dtype, _ in seen)


def test_rl_trainer_resolves_auto_as_rl_work(rl_dirs, monkeypatch):
    """The RL stage asks for the "rl" threshold, not the training one: with the AMX "rl" threshold
    raised above this d=256 policy, auto gives float32, where "train" would give bf16."""
    from ppo_rlhf.config import PPOConfig, build_config
    from ppo_rlhf.stages import rl

    monkeypatch.setattr(precision, "cpu_info", lambda: ("AMX CPU", SAPPHIRE_RAPIDS))
    monkeypatch.setitem(precision.BF16_MIN_HIDDEN, ("amx_bf16", "rl"), 512)
    cfg = build_config(PPOConfig, overrides=[
        f"policy={rl_dirs / 'sft'}", f"reward_model={rl_dirs / 'rm'}", f"prompts_file={rl_dirs / 'prompts.jsonl'}",
        f"out_dir={rl_dirs / 'out_auto'}", "run.tensorboard=false"])
    assert cfg.run.dtype == "auto"
    assert common.compute_dtype(cfg.run, CPU, cfg.policy) == "bfloat16"
    assert rl.RLTrainer(cfg, CPU).dtype == "float32"
