import math
import os
import signal
import threading

import pytest
import torch

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


def _params_with_grads(*grads):
    params = []
    for grad in grads:
        p = torch.nn.Parameter(torch.zeros_like(grad))
        p.grad = grad
        params.append(p)
    return params


def test_check_loss():
    assert NonFiniteGuard.check_loss(torch.tensor(1.0))
    assert not NonFiniteGuard.check_loss(torch.tensor(math.nan))
    assert not NonFiniteGuard.check_loss(torch.tensor([1.0, -math.inf]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_grads_finds_one_bad_element(bad):
    grads = [torch.ones(3, 4), torch.ones(5), torch.ones(2, dtype=torch.bfloat16)]
    assert NonFiniteGuard.check_grads(_params_with_grads(*grads))
    grads[1][3] = bad
    assert not NonFiniteGuard.check_grads(_params_with_grads(*grads))


def test_check_grads_large_finite_values_are_fine():
    assert NonFiniteGuard.check_grads(_params_with_grads(torch.full((1000,), 3e38)))


def test_check_grads_without_grads():
    assert NonFiniteGuard.check_grads([torch.nn.Parameter(torch.ones(2))])
    assert NonFiniteGuard.check_grads([])


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


def test_should_step_combines_loss_and_grads():
    guard = NonFiniteGuard(max_consecutive=2)
    model = torch.nn.Linear(3, 1)
    loss = model(torch.ones(2, 3)).sum()
    loss.backward()
    assert guard.should_step(loss, model.parameters())
    model.weight.grad[0, 0] = math.nan
    assert not guard.should_step(loss.detach(), model.parameters(), step=7)
    with pytest.raises(NonFiniteLossError, match="at step 8; no checkpoint was saved yet"):
        guard.should_step(torch.tensor(math.nan), model.parameters(), step=8)
