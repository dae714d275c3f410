"""Signals held around the main thread's lock operations (apr.atomicfile.held_signals, held_result): a
Ctrl-C is delivered after the block, never inside threading's locks, and still promptly."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from apr.atomicfile import held_result, held_signals


def test_a_signal_in_a_held_block_is_raised_when_the_block_ends() -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt), held_signals():
        signal.raise_signal(signal.SIGINT)
        reached.append("after the signal, still in the block")
    assert reached == ["after the signal, still in the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_held_result_returns_and_reraises() -> None:
    with ThreadPoolExecutor(1) as pool:
        assert held_result(pool.submit(lambda: 42)) == 42
        with pytest.raises(ZeroDivisionError):
            held_result(pool.submit(lambda: 1 // 0))


def test_held_result_acts_on_a_ctrl_c_within_its_poll_and_the_pool_still_shuts_down() -> None:
    release, main = threading.Event(), threading.get_ident()
    pool = ThreadPoolExecutor(1)
    future = pool.submit(release.wait, 30)
    threading.Timer(0.05, signal.pthread_kill, (main, signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        held_result(future, poll=0.1)
    assert time.monotonic() - start < 5  # not held until the work ends (30 s)
    release.set()
    closer = threading.Thread(target=pool.shutdown, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "the pool's worker could not finish: a lock was left taken"
