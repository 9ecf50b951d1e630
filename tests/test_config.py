"""Config loading: defaults <- YAML <- overrides, with errors for people."""

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppo_rlhf.config import (
    STAGE_CONFIGS,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    all_keys,
    build_config,
    describe,
    help_text,
    markdown_reference,
    opt,
    parse_override,
    to_dict,
)
from ppo_rlhf.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_yaml_and_overrides_apply_in_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 0.01\ntrain:\n  updates: 7\nrollout:\n  temperature: 0.9\n")
    cfg = build_config(PPOConfig, y, ["optim.lr=3e-4", "reward.kl_control=adaptive"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # command line wins over YAML
    assert cfg.train.updates == 7
    assert cfg.rollout.temperature == pytest.approx(0.9)
    assert cfg.reward.kl_control == "adaptive"
    assert cfg.loss.clip_eps == pytest.approx(0.2)  # default kept


def test_unknown_key_gets_did_you_mean():
    with pytest.raises(UserError, match=r"unknown config key 'optim.lrr'.*optim.lr"):
        build_config(SFTConfig, overrides=["optim.lrr=1"])
    with pytest.raises(UserError, match=r"Did you mean 'optim.lr'"):
        build_config(SFTConfig, overrides=["lr=1"])


@pytest.mark.parametrize("stage, key", [
    ("rl", key) for key in ("model.path=x", "model.tokenizer=x", "model.arch=llama", "model.layers=8",
                            "model.hidden=64", "model.heads=2")
] + [("reward", key) for key in ("model.arch=llama", "model.layers=8", "model.hidden=64", "model.heads=2")])
def test_a_stage_refuses_the_model_options_it_does_not_use(stage, key):
    with pytest.raises(UserError, match=rf"unknown config key '{key.split('=')[0]}'.*This stage does not use it"):
        build_config(STAGE_CONFIGS[stage], overrides=[key])


def test_refused_model_options_say_what_the_stage_does_instead():
    with pytest.raises(UserError, match=r"policy is `policy=DIR`.*model\.\* holds only the LoRA options"):
        build_config(PPOConfig, overrides=["model.layers=8"])
    with pytest.raises(UserError, match=r"ppo.model.path.*policy is `policy=DIR`"):
        build_config(STAGE_CONFIGS["pipeline"], overrides=["ppo.model.path=x"])
    with pytest.raises(UserError, match=r"reward model's trunk is the SFT model at model.path"):
        build_config(RewardConfig, overrides=["model.layers=8"])
    with pytest.raises(UserError, match=r"reward.model.heads.*reward model's trunk"):
        build_config(STAGE_CONFIGS["pipeline"], overrides=["reward.model.heads=2"])


def test_each_stage_keeps_the_model_options_it_reads():
    rl = build_config(PPOConfig, overrides=["model.lora_r=8", "model.lora_alpha=32", "model.lora_dropout=0.1"])
    assert (rl.model.lora_r, rl.model.lora_alpha, rl.model.lora_dropout) == (8, 32.0, 0.1)
    rm = build_config(RewardConfig, overrides=["model.path=d", "model.tokenizer=t", "model.lora_r=4"])
    assert (rm.model.path, rm.model.tokenizer, rm.model.lora_r) == ("d", "t", 4)
    sft = build_config(SFTConfig, overrides=["model.arch=llama", "model.layers=3", "model.hidden=64",
                                             "model.heads=2", "model.lora_r=2", "model.tokenizer=t"])
    assert (sft.model.arch, sft.model.layers, sft.model.hidden, sft.model.heads) == ("llama", 3, 64, 2)


@pytest.mark.parametrize("override, message", [
    ("train.updates=abc", "train.updates: expected an integer"),
    ("train.updates=0", "below the minimum"),
    ("rollout.top_p=1.5", "above the maximum"),
    ("reward.kl_estimator=k9", "not one of k1, k2, k3"),
    ("run.tensorboard=maybe", "expected true or false"),
    ("optim.lr=nan", "finite"),
    ("loss=3", "expected a mapping"),
    ("noequals", "key=value"),
])
def test_bad_values_are_rejected(override, message):
    with pytest.raises(UserError, match=message):
        build_config(PPOConfig, overrides=[override])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: invalid YAML"):
        build_config(SFTConfig, bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        build_config(SFTConfig, top)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  lr: fast\n")
    with pytest.raises(UserError, match=r"wrong.yaml: optim.lr: expected a number"):
        build_config(SFTConfig, wrong)
    with pytest.raises(UserError, match="config file not found"):
        build_config(SFTConfig, tmp_path / "missing.yaml")


def test_every_option_is_documented():
    for name, cls in STAGE_CONFIGS.items():
        for key, _typ, _default, doc in describe(cls):
            assert doc.strip(), f"{name}: option {key} has no docstring"
    text = help_text(RewardConfig)
    assert "margin" in text and "Bradley-Terry" in text


def test_configuration_reference_is_in_sync():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc.strip() == markdown_reference().strip(), (
        "docs/configuration.md is stale: run `python -m ppo_rlhf.config > docs/configuration.md`")


def test_yaml_presets_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        name = path.stem.split("-")[-1]
        cls = STAGE_CONFIGS.get(name, STAGE_CONFIGS["pipeline"])
        cfg = build_config(cls, path)
        assert to_dict(cfg) != to_dict(cls()), f"{path.name} changes nothing"


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(all_keys(PPOConfig) + ["nope", "optim.nope", ""]),
       value=st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=True), st.booleans()))
def test_random_overrides_never_crash(key, value):
    try:
        cfg = build_config(PPOConfig, overrides=[f"{key}={value}"])
    except UserError as e:
        assert str(e).strip()
        return
    assert build_config(PPOConfig, base=to_dict(cfg)) == cfg  # what is accepted round-trips


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_random_yaml_bytes_never_crash(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("y") / "c.yaml"
    p.write_bytes(data)
    try:
        cfg = build_config(SFTConfig, p)
    except UserError as e:
        assert str(p) in str(e), e  # every error names the file
        return
    assert build_config(SFTConfig, base=to_dict(cfg)) == cfg


def test_parse_override_types():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=runs/x") == ("a", "runs/x")
    assert parse_override("a=") == ("a", "")


@dataclasses.dataclass
class _Inner:
    """A nested group."""

    limit: int | None = opt(None, "Optional int with a minimum.", min=1)


@dataclasses.dataclass
class _WithOptional:
    """A config with Optional fields."""

    temperature: float | None = opt(None, "Optional float; None = the task's default.", min=0)
    name: str | None = opt(None, "Optional string.")
    flag: bool | None = opt(True, "Optional bool set by default.")
    inner: _Inner = opt(factory=_Inner, help="Nested.")


def test_optional_fields_take_null_as_unset_and_values_as_their_type(tmp_path):
    cfg = build_config(_WithOptional)
    assert cfg.temperature is None and cfg.name is None and cfg.flag is True and cfg.inner.limit is None
    cfg = build_config(_WithOptional, overrides=["temperature=0.5", "inner.limit=3", "name=none"])
    assert cfg.temperature == 0.5 and isinstance(cfg.temperature, float)
    assert cfg.inner.limit == 3
    assert cfg.name == "none"  # a string field keeps the text; only a YAML null unsets it
    for text in ("null", "none", "None", "~", "NULL"):
        cfg = build_config(_WithOptional, overrides=["temperature=1", f"temperature={text}",
                                                     f"flag={text}", f"inner.limit={text}"])
        assert cfg.temperature is None and cfg.flag is None and cfg.inner.limit is None, text
    y = tmp_path / "c.yaml"
    y.write_text("temperature: null\nname: null\nflag: false\ninner:\n  limit: ~\n")
    cfg = build_config(_WithOptional, y, base={"temperature": 2.0, "name": "x", "inner": {"limit": 4}})
    assert (cfg.temperature, cfg.name, cfg.flag, cfg.inner.limit) == (None, None, False, None)


def test_optional_fields_still_type_and_range_check_values():
    with pytest.raises(UserError, match=r"command line: temperature: expected a number or null, got 'hot'"):
        build_config(_WithOptional, overrides=["temperature=hot"])
    with pytest.raises(UserError, match=r"inner.limit: expected an integer or null"):
        build_config(_WithOptional, overrides=["inner.limit=1.5"])
    with pytest.raises(UserError, match=r"temperature: -1.0 is below the minimum 0"):
        build_config(_WithOptional, overrides=["temperature=-1"])
    with pytest.raises(UserError, match=r"inner.limit: 0 is below the minimum 1"):
        build_config(_WithOptional, overrides=["inner.limit=0"])


def test_optional_fields_describe_and_round_trip_through_to_dict():
    rows = {key: (typ, default) for key, typ, default, _doc in describe(_WithOptional)}
    assert rows["temperature"] == ("float or null", None)
    assert rows["name"] == ("str or null", None)
    assert rows["inner.limit"] == ("int or null", None)
    assert "temperature=None  (float or null)" in help_text(_WithOptional)
    cfg = build_config(_WithOptional, overrides=["inner.limit=7"])
    d = to_dict(cfg)
    assert d == {"temperature": None, "name": None, "flag": True, "inner": {"limit": 7}}
    # summary.json / checkpoints store to_dict(); reading it back gives the same config
    assert build_config(_WithOptional, base=d) == cfg


@pytest.mark.parametrize("cls, key, old_sentinel", [
    ("data", "noise_temperature", -1), ("sft", "max_new_tokens", 0), ("eval", "max_new_tokens", 0),
    ("tokenizer", "vocab_size", 0),
])
def test_unset_is_null_not_a_sentinel(cls, key, old_sentinel):
    cls = STAGE_CONFIGS[cls]
    assert getattr(cls(), key) is None
    assert getattr(build_config(cls, overrides=[f"{key}=null"]), key) is None
    with pytest.raises(UserError, match=rf"{key}: {old_sentinel}(\.0)? is below the minimum .*; null = unset"):
        build_config(cls, overrides=[f"{key}={old_sentinel}"])


def test_pipeline_help_says_which_stage_options_the_pipeline_fills_in():
    rows = {key: doc for key, _typ, _default, doc in describe(STAGE_CONFIGS["pipeline"])}
    for stage in ("tokenizer", "data", "sft", "reward", "ppo"):
        assert rows[f"{stage}.out_dir"].startswith(f"Set by the pipeline to out_dir/{stage} unless given."), stage
        assert "required" not in rows[f"{stage}.out_dir"]
    assert "(required)" in dict((k, d) for k, _t, _v, d in describe(STAGE_CONFIGS["tokenizer"]))["out_dir"]
    assert "Set by the pipeline" in help_text(STAGE_CONFIGS["pipeline"])
