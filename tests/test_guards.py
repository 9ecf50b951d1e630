import os
import signal
import threading

import pytest

from ppo_rlhf.errors import NonFiniteLossError, UserError
from ppo_rlhf.guards import GracefulStop, NonFiniteGuard


def test_sigint_requests_a_stop_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_requests_a_stop():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM does not kill the run
        assert stop.requested and stop.signal_name == "SIGTERM"


def test_second_sigint_aborts():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested


def test_outside_the_main_thread_it_is_a_no_op():
    before = signal.getsignal(signal.SIGINT)
    seen = []

    def worker():
        with GracefulStop() as stop:
            seen.append(signal.getsignal(signal.SIGINT))
        seen.append(stop.requested)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before, False]


def test_counting_and_error_after_max_consecutive():
    guard = NonFiniteGuard(max_consecutive=3)
    for ok in (False, False, True, False, False):
        guard.record(ok)
    assert (guard.consecutive, guard.skipped_total) == (2, 4)
    with pytest.raises(NonFiniteLossError) as info:
        guard.record(False, step=42, last_checkpoint="runs/x/checkpoints/step_00000040")
    message = str(info.value)
    assert message.startswith(
        "loss/gradients were non-finite for 3 steps in a row at step 42; "
        "the last good checkpoint is runs/x/checkpoints/step_00000040; "
    )
    assert "lower the learning rate" in message
    assert isinstance(info.value, UserError)


def test_error_without_a_checkpoint_says_so():
    guard = NonFiniteGuard(max_consecutive=2)
    guard.record(False, step=7)
    with pytest.raises(NonFiniteLossError, match="at step 8; no checkpoint was saved yet"):
        guard.record(False, step=8)
