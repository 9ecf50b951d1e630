"""Atomic, verified, keep-last-K checkpoints of ALL training state.

Layout of one checkpoint (`run_dir/checkpoints/step_00000040/`):

    policy.safetensors     each torch module in `state` (its state_dict; tied tensors stored once)
    optimizer.pt           anything else with a `state_dict()` (optimizers, schedulers, KL control)
    state.pt               the plain values (step counters, data position, RNG states, ...)
    manifest.json          size + sha256 of every file above; written last

The directory is built under a hidden temporary name and renamed into place, so a crash or a full
disk leaves the previous checkpoints untouched. `latest_valid()` re-hashes each candidate and skips
a corrupted or incomplete one with a warning. Typical use in a stage:

    ckpt = CheckpointManager(run_dir, keep_last=2, enabled=is_rank0)
    if resume and (path := ckpt.latest_valid()):
        values = ckpt.load(path, {"policy": policy, "optimizer": opt, "scheduler": sched})
        set_rng_state(values["rng"]); step = values["step"]
    ...
    ckpt.save(step, {"policy": policy, "optimizer": opt, "scheduler": sched,
                     "step": step, "rng": rng_state()})
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from ppo_rlhf.errors import UserError
from ppo_rlhf.fileio import atomic_directory

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PLAIN_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The training step of a checkpoint directory named `step_00000040` (-> 40)."""
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise UserError(
            f"{path}: not a checkpoint directory (expected a name like step_00000040); "
            "fix: pass a directory from <run_dir>/checkpoints/"
        )
    return int(match.group(1))


def rng_state() -> dict[str, Any]:
    """Snapshot of the python, numpy and torch (CPU + every CUDA device) generators.

    Only tensors and python scalars/containers, so it loads with `torch.load(weights_only=True)`.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from `rng_state()`; resumed sampling/dropout is then bit-identical."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


class CheckpointManager:
    """Saves, verifies, prunes and loads checkpoints under `run_dir/checkpoints/`.

    `enabled=False` (non-zero DDP ranks) turns `save` into a no-op; loading works on every rank.
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep_last: int = 2, enabled: bool = True):
        if keep_last < 1:
            raise UserError(
                f"checkpoint keep_last={keep_last} must be >= 1; fix: set it to 1 or more"
            )
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.enabled = enabled
        self._verified: set[Path] = set()

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    def list(self) -> list[Path]:
        """Complete-looking checkpoint directories, oldest first (temporary dirs are hidden)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=checkpoint_step)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write `state` as checkpoint `step` atomically, then prune; returns its directory.

        Modules -> `{name}.safetensors`, objects with `state_dict()` -> `{name}.pt`, everything
        else (python scalars, containers, tensors) -> `state.pt`. Plain values must load with
        `torch.load(weights_only=True)`: use python numbers, not numpy ones.
        """
        path = self.path_for(step)
        if not self.enabled:
            return path
        for name in state:
            if not _NAME.match(name) or name in ("state", "manifest"):
                raise ValueError(f"checkpoint entry name {name!r} cannot be used as a file name")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        try:
            with atomic_directory(path) as tmp:
                files = _write_state(tmp, state)
                manifest = {"step": step, "files": {f: _file_record(tmp / f) for f in files}}
                _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        except Exception as exc:  # safetensors wraps OS errors in its own SafetensorError
            if not _is_disk_full(exc):
                raise
            previous = [p.name for p in self.list() if p != path]
            kept = (
                f"the previous checkpoint {previous[-1]} is intact"
                if previous
                else "there is no earlier checkpoint"
            )
            raise UserError(
                f"no space left while writing checkpoint {path}; {kept}; "
                "fix: free disk space (or lower checkpoint keep_last) and resume with --resume"
            ) from exc
        self._verified.add(path)
        self._prune(path)
        return path

    def verify(self, path: str | os.PathLike) -> str | None:
        """Why checkpoint `path` is unusable (no manifest, size or sha256 mismatch), or None."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            records = manifest["files"]
        except FileNotFoundError:
            return f"{MANIFEST} is missing, the save did not complete"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{MANIFEST} is unreadable ({exc})"
        if not isinstance(records, dict):
            return f"{MANIFEST} is unreadable (no file list)"
        for name, record in records.items():
            file = path / name
            if not file.is_file():
                return f"{name}: missing"
            try:
                size, sha256 = record["size"], record["sha256"]
            except (KeyError, TypeError):
                return f"{MANIFEST} is unreadable (bad entry for {name})"
            if file.stat().st_size != size:
                return f"{name}: size {file.stat().st_size} bytes, expected {size} (truncated?)"
            if _sha256(file) != sha256:
                return f"{name}: sha256 mismatch"
        self._verified.add(path)
        return None

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that passes `verify`; corrupted ones are skipped with a warning."""
        candidates = self.list()
        for i in range(len(candidates) - 1, -1, -1):
            problem = self.verify(candidates[i])
            if problem is None:
                return candidates[i]
            fallback = (
                f"falling back to {candidates[i - 1].name}" if i > 0 else "no earlier checkpoint"
            )
            log.warning(
                "checkpoint %s is corrupted (%s); %s", candidates[i].name, problem, fallback
            )
        return None

    def load(self, path: str | os.PathLike, state: dict[str, Any]) -> dict[str, Any]:
        """Load checkpoint `path` in place into the modules / `state_dict()` objects of `state`.

        Returns the plain values saved with it (step counters, RNG states, ...). Entries of `state`
        that are plain values are ignored (they are outputs, found in the returned dict).
        """
        path = Path(path)
        if path not in self._verified:
            problem = self.verify(path)
            if problem is not None:
                raise UserError(
                    f"checkpoint {path} is corrupted ({problem}); "
                    "fix: resume from an earlier checkpoint or start a new run"
                )
        for name, obj in state.items():
            if isinstance(obj, torch.nn.Module):
                _load_module(path / f"{name}.safetensors", obj)
            elif isinstance(obj, torch.Generator):
                continue
            elif callable(getattr(obj, "load_state_dict", None)):
                file = path / f"{name}.pt"
                try:
                    obj.load_state_dict(_torch_load(file))
                except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                    raise UserError(
                        f"{file}: does not fit the current {type(obj).__name__} ({_shorten(exc)}); "
                        "fix: resume with the same configuration the run was started with"
                    ) from exc
        values = _torch_load(path / PLAIN_FILE)
        for name, obj in state.items():
            if isinstance(obj, torch.Generator):
                obj.set_state(values.pop(name))
        return values

    def _prune(self, just_written: Path) -> None:
        """Keep the `keep_last` newest checkpoints up to `just_written`; drop the rest.

        Checkpoints newer than the one just written belong to an abandoned run that this run
        resumed from an earlier step; left in place they would shadow it on the next resume.
        """
        step = checkpoint_step(just_written)
        older = [p for p in self.list() if checkpoint_step(p) < step]
        for stale in [p for p in self.list() if checkpoint_step(p) > step]:
            log.warning(
                "removing checkpoint %s: it is newer than %s, from the run this one resumed",
                stale.name,
                just_written.name,
            )
            self._remove(stale)
        for old in older[: max(0, len(older) - (self.keep_last - 1))]:
            self._remove(old)

    def _remove(self, path: Path) -> None:
        self._verified.discard(path)
        shutil.rmtree(path, ignore_errors=True)

    def _remove_stale_temporaries(self) -> None:
        """Delete half-written `.step_*.tmp` dirs left by a killed process (one writer per run)."""
        for tmp in self.dir.glob(".step_*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)


def _write_state(directory: Path, state: dict[str, Any]) -> list[str]:
    """Write every entry of `state` into `directory`; returns the file names written."""
    files, plain = [], {}
    for name, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            # save_model stores tied tensors (e.g. GPT-2's lm_head = wte) once; save_file refuses.
            save_model(obj, str(directory / f"{name}.safetensors"), force_contiguous=True)
            files.append(f"{name}.safetensors")
        elif isinstance(obj, torch.Generator):
            plain[name] = obj.get_state()
        elif callable(getattr(obj, "state_dict", None)):
            _torch_save(obj.state_dict(), directory / f"{name}.pt")
            if not isinstance(obj, torch.optim.Optimizer):  # optimizers hold only safe types
                _check_loadable(directory / f"{name}.pt", name)
            files.append(f"{name}.pt")
        else:
            plain[name] = obj
    _torch_save(plain, directory / PLAIN_FILE)
    _check_loadable(directory / PLAIN_FILE, ", ".join(plain))
    return files + [PLAIN_FILE]


def _check_loadable(file: Path, entries: str) -> None:
    """Fail at save time, not at resume time, on values that weights_only loading rejects."""
    try:
        torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TypeError(
            f"checkpoint entries ({entries}) hold a type that torch.load(weights_only=True) "
            f"refuses ({_shorten(exc)}); store python numbers/str/lists/dicts or tensors "
            "(e.g. float(x) for numpy scalars)"
        ) from exc


class _RecordingWriter:
    """File wrapper that keeps the OSError of a failed write.

    torch.save reports a failed write as an opaque RuntimeError ("unexpected pos ..."); keeping
    the original error lets a full disk be told apart from other failures.
    """

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()


def _torch_save(obj: Any, file: Path) -> None:
    with open(file, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as exc:
            if writer.error is not None:
                raise writer.error from exc
            raise


def _write_bytes(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)


def _torch_load(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # bad bytes surface as UnpicklingError, zipfile/RuntimeError, EOFError
        raise UserError(
            f"{file}: cannot be loaded ({exc}); fix: resume from another checkpoint"
        ) from exc


def _load_module(file: Path, module: torch.nn.Module) -> None:
    if not file.is_file():
        raise UserError(
            f"{file}: missing; the checkpoint has no module named {file.stem!r}; "
            "fix: resume with the same configuration the run was started with"
        )
    try:
        load_model(module, str(file), strict=True)
    except Exception as exc:  # SafetensorError for bad bytes, RuntimeError for key/shape mismatch
        raise UserError(
            f"{file}: does not fit the current {type(module).__name__} ({_shorten(exc)}); "
            "fix: resume with the same model configuration the run was started with"
        ) from exc


def _shorten(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _file_record(file: Path) -> dict[str, Any]:
    return {"size": file.stat().st_size, "sha256": _sha256(file)}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_disk_full(exc: BaseException | None) -> bool:
    """True when `exc` (or what caused it) is a full disk or exhausted quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        if any(os.strerror(code) in str(exc) for code in _DISK_FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
