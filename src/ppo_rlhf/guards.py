"""Clean stops on Ctrl-C / SIGTERM and a guard against non-finite losses and gradients.

guard = NonFiniteGuard(max_consecutive=5)
with GracefulStop() as stop:
    for step in range(start, total):
        loss = compute_loss(batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        ok = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
        guard.record(ok, step=step, last_checkpoint=last)  # raises after 5 bad steps in a row
        if ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if stop.requested:
            ckpt.save(step, state)
            print(f"stopped at step {step}; resume with: {command} --resume")
            break
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from ppo_rlhf.errors import NonFiniteLossError

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Turns the first SIGINT/SIGTERM into `requested = True`; a second SIGINT aborts as usual.

    The loop checks `requested` after each step, saves a checkpoint and exits 0. Handlers can
    only be installed from the main thread; elsewhere this is a no-op (never requested). Under
    torchrun every rank receives the signal, but a rank may see it one step later than another:
    all-reduce the flag before acting on it.
    """

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            # getsignal() returns None for handlers not installed from Python; SIG_DFL is closest.
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        # From now on Ctrl-C raises KeyboardInterrupt, for someone who does not want to wait.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning(
            "%s received: finishing the current step, then saving a checkpoint and stopping "
            "(press Ctrl-C again to abort without saving)",
            self.signal_name,
        )


class NonFiniteGuard:
    """Counts optimizer steps skipped for a NaN/inf loss or gradient; gives up after N in a row.

    The check itself is where the gradient norm is computed anyway (`stages.common.clip_and_step`:
    a non-finite total norm means a non-finite gradient); this keeps the counts and the error.
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped_total = 0

    def record(
        self, ok: bool, *, step: int | None = None, last_checkpoint: str | os.PathLike | None = None
    ) -> None:
        """Count a skipped (`ok=False`) or good step; raise after `max_consecutive` bad in a row."""
        if ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped_total += 1
        at_step = f" at step {step}" if step is not None else ""
        log.warning(
            "non-finite loss/gradients%s: optimizer step skipped (%d in a row)",
            at_step,
            self.consecutive,
        )
        if self.consecutive >= self.max_consecutive:
            checkpoint = (
                f"the last good checkpoint is {last_checkpoint}"
                if last_checkpoint is not None
                else "no checkpoint was saved yet"
            )
            raise NonFiniteLossError(
                f"loss/gradients were non-finite for {self.consecutive} steps in a row{at_step}; "
                f"{checkpoint}; fix: lower the learning rate, enable gradient clipping or use "
                "fp32/bf16 instead of fp16, check the data for empty or degenerate examples, "
                "then resume with --resume"
            )
