import errno
import json
import logging
import random
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppo_rlhf import checkpoint
from ppo_rlhf.checkpoint import CheckpointManager, checkpoint_step, rng_state, set_rng_state
from ppo_rlhf.errors import UserError


class TiedLM(torch.nn.Module):
    """Embedding and output layer share one weight, like GPT-2's wte / lm_head; has dropout."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, dim)
        self.hidden = torch.nn.Linear(dim, dim)
        self.dropout = torch.nn.Dropout(0.3)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        return self.lm_head(self.dropout(torch.tanh(self.hidden(self.wte(tokens)))))


def make_run(seed):
    torch.manual_seed(seed)
    model = TiedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps):
    """Draws data from python, numpy and torch generators so all three must be restored."""
    losses = []
    for _ in range(steps):
        n = random.randint(3, 6)
        shift = int(np.random.randint(0, 3))
        tokens = (torch.randint(0, 11, (n, 5)) + shift) % 11
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def state_of(model, optimizer, scheduler, step):
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "step": step,
        "rng": rng_state(),
    }


def test_resume_is_bit_identical(tmp_path):
    random.seed(0)
    np.random.seed(0)
    model, optimizer, scheduler = make_run(seed=0)
    train(model, optimizer, scheduler, 3)
    ckpt = CheckpointManager(tmp_path)
    path = ckpt.save(3, state_of(model, optimizer, scheduler, 3))
    expected_losses = train(model, optimizer, scheduler, 3)

    random.seed(123)
    np.random.seed(123)
    resumed, resumed_opt, resumed_sched = make_run(seed=1)
    values = CheckpointManager(tmp_path).load(
        path, {"model": resumed, "optimizer": resumed_opt, "scheduler": resumed_sched}
    )
    set_rng_state(values["rng"])
    assert values["step"] == 3
    assert resumed.lm_head.weight is resumed.wte.weight  # tying survives the load
    assert train(resumed, resumed_opt, resumed_sched, 3) == expected_losses
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert scheduler.state_dict() == resumed_sched.state_dict()


def test_files_and_manifest(tmp_path):
    model, optimizer, scheduler = make_run(seed=0)
    path = CheckpointManager(tmp_path).save(7, state_of(model, optimizer, scheduler, 7))
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert checkpoint_step(path) == 7
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "state.pt",
    ]
    assert manifest["step"] == 7
    assert len(manifest["files"]["state.pt"]["sha256"]) == 64


def test_gpt2_tied_lm_head_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    path = CheckpointManager(tmp_path).save(1, {"policy": model})
    torch.manual_seed(1)
    other = transformers.GPT2LMHeadModel(config)
    CheckpointManager(tmp_path).load(path, {"policy": other})
    assert other.lm_head.weight is other.transformer.wte.weight
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_generator_state_is_restored(tmp_path):
    gen = torch.Generator().manual_seed(5)
    torch.randperm(10, generator=gen)
    path = CheckpointManager(tmp_path).save(1, {"data_generator": gen, "epoch": 2})
    expected = torch.randperm(10, generator=gen)
    other = torch.Generator().manual_seed(99)
    values = CheckpointManager(tmp_path).load(path, {"data_generator": other})
    assert values == {"epoch": 2}
    assert torch.equal(torch.randperm(10, generator=other), expected)


def test_keep_last_prunes_older_checkpoints(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        ckpt.save(step, {"step": step})
    assert [checkpoint_step(p) for p in ckpt.list()] == [30, 40]


def test_saving_an_earlier_step_removes_the_abandoned_newer_ones(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=3)
    for step in (10, 20, 30):
        ckpt.save(step, {"step": step})
    ckpt.save(15, {"step": 15})  # resumed from 10, the run at 20/30 is abandoned
    assert [checkpoint_step(p) for p in ckpt.list()] == [10, 15]
    assert ckpt.latest_valid().name == "step_00000015"


def test_disabled_manager_writes_nothing(tmp_path):
    path = CheckpointManager(tmp_path, enabled=False).save(1, {"step": 1})
    assert path.name == "step_00000001"
    assert not (tmp_path / "checkpoints").exists()


def _two_checkpoints(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=3)
    model, optimizer, scheduler = make_run(seed=0)
    ckpt.save(20, state_of(model, optimizer, scheduler, 20))
    latest = ckpt.save(40, state_of(model, optimizer, scheduler, 40))
    return ckpt, latest


def _flip_byte(file, offset):
    data = bytearray(file.read_bytes())
    data[offset % len(data)] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda p: _flip_byte(p / "model.safetensors", 100), "model.safetensors: sha256 mismatch"),
        (lambda p: _flip_byte(p / "state.pt", -1), "state.pt: sha256 mismatch"),
        (
            lambda p: (p / "optimizer.pt").write_bytes((p / "optimizer.pt").read_bytes()[:50]),
            "optimizer.pt: size 50 bytes",
        ),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda p: (p / "scheduler.pt").unlink(), "scheduler.pt: missing"),
        (lambda p: (p / "manifest.json").write_text('{"files": '), "manifest.json is unreadable"),
    ],
)
def test_corrupted_checkpoint_falls_back_with_warning(tmp_path, caplog, corrupt, reason):
    _, latest = _two_checkpoints(tmp_path)
    corrupt(latest)
    fresh = CheckpointManager(tmp_path, keep_last=3)
    with caplog.at_level(logging.WARNING, logger="ppo_rlhf.checkpoint"):
        assert fresh.latest_valid().name == "step_00000020"
    assert f"checkpoint step_00000040 is corrupted ({reason}" in caplog.text
    assert "falling back to step_00000020" in caplog.text
    model, optimizer, scheduler = make_run(seed=3)
    with pytest.raises(UserError, match="step_00000040 is corrupted"):
        fresh.load(latest, {"model": model, "optimizer": optimizer, "scheduler": scheduler})


def test_no_valid_checkpoint(tmp_path, caplog):
    ckpt = CheckpointManager(tmp_path)
    assert ckpt.latest_valid() is None
    path = ckpt.save(1, {"step": 1})
    (path / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="ppo_rlhf.checkpoint"):
        assert ckpt.latest_valid() is None
    assert "no earlier checkpoint" in caplog.text


def test_leftover_temporary_directory_is_ignored_and_cleaned(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(1, {"step": 1})
    leftover = tmp_path / "checkpoints" / ".step_00000002.abc.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert [p.name for p in ckpt.list()] == ["step_00000001"]
    ckpt.save(3, {"step": 3})
    assert not leftover.exists()


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = CheckpointManager(tmp_path)
    model, optimizer, scheduler = make_run(seed=0)
    ckpt.save(10, state_of(model, optimizer, scheduler, 10))

    def full_disk(module, filename, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    with pytest.raises(
        UserError,
        match=r"no space left while writing checkpoint .*step_00000020; "
        r"the previous checkpoint step_00000010 is intact",
    ):
        ckpt.save(20, state_of(model, optimizer, scheduler, 20))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010"]
    assert ckpt.latest_valid().name == "step_00000010"
    other, other_opt, _ = make_run(seed=1)
    values = ckpt.load(ckpt.latest_valid(), {"model": other, "optimizer": other_opt})
    assert values["step"] == 10


def test_disk_full_inside_torch_save_is_recognised(tmp_path, monkeypatch):
    """torch.save hides the OSError behind a RuntimeError; the manager must still see ENOSPC."""
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(1, {"step": 1})
    real_open = open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullFile(f) if str(file).endswith(".pt") and "w" in mode else f

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(UserError, match="no space left.*step_00000001 is intact"):
        ckpt.save(2, {"step": 2, "opt": torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], 0.1)})
    monkeypatch.undo()
    assert [p.name for p in ckpt.list()] == ["step_00000001"]


def test_other_write_errors_propagate_unchanged(tmp_path, monkeypatch):
    def broken(module, filename, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint, "save_model", broken)
    with pytest.raises(PermissionError):
        CheckpointManager(tmp_path).save(1, {"m": torch.nn.Linear(2, 2)})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_load_into_mismatched_model_names_the_file(tmp_path):
    path = CheckpointManager(tmp_path).save(1, {"model": torch.nn.Linear(3, 4)})
    with pytest.raises(UserError, match=r"model\.safetensors: does not fit the current Linear"):
        CheckpointManager(tmp_path).load(path, {"model": torch.nn.Linear(3, 5)})
    with pytest.raises(UserError, match=r"value_model\.safetensors: missing"):
        CheckpointManager(tmp_path).load(path, {"value_model": torch.nn.Linear(3, 4)})


def test_load_into_mismatched_optimizer_names_the_file(tmp_path):
    model = torch.nn.Linear(3, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = CheckpointManager(tmp_path).save(1, {"optimizer": optimizer})
    other = torch.optim.AdamW(torch.nn.Linear(3, 4, bias=False).parameters())
    with pytest.raises(UserError, match=r"optimizer\.pt: does not fit the current AdamW"):
        CheckpointManager(tmp_path).load(path, {"optimizer": other})


def test_values_that_cannot_be_loaded_back_fail_at_save_time(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match=r"entries \(step, mean\).*numpy scalars"):
        ckpt.save(1, {"step": 1, "mean": np.float64(0.5)})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_checkpoint_step_rejects_other_names(tmp_path):
    with pytest.raises(UserError, match="not a checkpoint directory"):
        checkpoint_step(tmp_path / "latest")


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="keep_last=0"):
        CheckpointManager(tmp_path, keep_last=0)


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert first[:3] == second[:3]
    assert torch.equal(first[3], second[3])


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    model, optimizer, scheduler = make_run(seed=0)
    train(model, optimizer, scheduler, 1)
    path = CheckpointManager(run_dir).save(1, state_of(model, optimizer, scheduler, 1))
    return path


@settings(max_examples=60, deadline=None)
@given(
    file_index=st.integers(min_value=0),
    offset=st.integers(min_value=0),
    data=st.binary(min_size=1, max_size=16),
)
def test_random_bytes_in_any_data_file_are_detected(saved_checkpoint, file_index, offset, data):
    files = sorted(p for p in saved_checkpoint.iterdir() if p.name != "manifest.json")
    file = files[file_index % len(files)]
    original = file.read_bytes()
    offset %= len(original)
    corrupted = original[:offset] + data + original[offset + len(data) :]
    if corrupted == original:
        return
    try:
        file.write_bytes(corrupted)
        problem = CheckpointManager(saved_checkpoint.parent.parent).verify(saved_checkpoint)
        assert problem is not None and problem.startswith(file.name)
    finally:
        file.write_bytes(original)
    assert CheckpointManager(saved_checkpoint.parent.parent).verify(saved_checkpoint) is None


def test_copied_checkpoint_verifies(saved_checkpoint, tmp_path):
    copy = tmp_path / "checkpoints" / saved_checkpoint.name
    shutil.copytree(saved_checkpoint, copy)
    assert CheckpointManager(tmp_path).latest_valid() == copy
