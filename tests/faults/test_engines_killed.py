"""Engine processes SIGKILLed: a worker mid-transfer over shm, a scheduler holding pins.

The server drops a killed process once it has been silent for ``--client-timeout``: its
registration, its sessions and their pins go within that timeout and one second more (the
expiry runs every quarter of the timeout), the shared-memory files of a dead worker go with
them where the server knew its pid (``unix://``), and another engine is served throughout.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvrpc.testing.serve import ServeProcess

from .conftest import scaled, wait_until
from .engines import LAYERS, Engine, server_options

pytestmark = pytest.mark.faults

CLIENT_TIMEOUT = 2.0
CHUNKS = 3


class Survivor:
    """An engine that stores and retrieves in a thread of its own until stopped, all checked."""

    def __init__(self, url: str) -> None:
        self.engine = Engine(url, "survivor")
        self.rounds = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._go = threading.Event()  # clear: hold still between rounds
        self._go.set()
        self._still = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ids = itertools.count()
        while not self._stop.is_set():
            if not self._go.is_set():
                self._still.set()
                self._go.wait()  # until go_on, or close
                continue
            seed = 1 + next(ids) % 4  # four prompts, stored once and retrieved from then on
            try:
                result = self.engine.round(f"s{next(ids)}", seed, CHUNKS)
            except AssertionError as exc:
                self.failures.append(str(exc))
                return
            if result[0] == "retrieved" and result[2:] != (0, 0):
                self.failures.append(f"a survivor's retrieve was not intact: {result}")
            self.rounds += 1

    def hold_still(self) -> None:
        """Wait until the survivor is between rounds, holding no pins, and keep it there."""
        self._still.clear()
        self._go.clear()
        assert self._still.wait(30), "the survivor's round did not end"

    def go_on(self) -> None:
        self._go.set()

    def served_after(self, rounds: int) -> None:
        """Wait for two more rounds than ``rounds``: the server still serves the survivor."""
        wait_until(
            lambda: (self.rounds, self.failures), lambda s: s[1] or s[0] >= rounds + 2, "survivor"
        )
        assert not self.failures, self.failures

    def close(self) -> None:
        self._stop.set()
        self._go.set()  # a survivor holding still wakes to see the stop
        self._thread.join(30)
        self.engine.close()


@pytest.fixture(params=["unix", "zmq+ipc"])
def local(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def served(
    serve: Callable[..., ServeProcess], local: str
) -> Iterator[tuple[ServeProcess, Survivor]]:
    server = serve(local, *server_options(256, CLIENT_TIMEOUT))
    survivor = Survivor(server.url)
    yield server, survivor
    survivor.close()


def _released_in_time(server: ServeProcess, expired: int, killed_at: float) -> None:
    """The killed process's client is dropped within the client timeout and a second."""
    wait_until(server.stats, lambda s: s["clients_expired"] >= expired, "the killed client dropped")
    took = time.monotonic() - killed_at
    assert took <= CLIENT_TIMEOUT + 1, f"released {took:.2f} s after the kill"


def test_a_worker_killed_mid_transfer_is_dropped_in_time_with_its_pins_and_its_shm_files(
    served: tuple[ServeProcess, Survivor], local: str
) -> None:
    server, survivor = served
    for round_ in range(scaled(1)):
        victim = Engine(server.url, "victim")
        seed = 100 + round_
        assert victim.round(f"v{round_}", seed, CHUNKS)[0] == "stored"
        before = server.stats()
        files = sorted(Path("/dev/shm").glob(f"kvrpc-{victim.pid}-*"))
        assert len(files) == LAYERS
        # The next round hits: the kill lands once its retrieve is submitted, in flight.
        victim.pipe.send(("round", f"v{round_}-hit", seed, CHUNKS))
        assert victim.answer() == "submitted"
        rounds = survivor.rounds
        victim.kill()
        killed_at = time.monotonic()
        # The worker and the scheduler adapter each are a client of the server.
        _released_in_time(server, before["clients_expired"] + 2, killed_at)
        survivor.served_after(rounds)
        survivor.hold_still()
        stats = server.stats()
        survivor.go_on()
        assert stats["pinned_chunks"] == 0 and stats["sessions"] == 0
        assert stats["instances"] == 1, "only the survivor's registration is left"
        if local == "unix":  # the server knew the worker's pid from its socket
            assert not any(f.exists() for f in files), "a dead worker's shm files are left"
            assert stats["shm_orphans_removed"] == before["shm_orphans_removed"] + LAYERS
        else:  # over zmq+ipc no pid is known: the files are left, removed here
            assert all(f.exists() for f in files)
            for f in files:
                f.unlink()


def test_a_scheduler_killed_holding_pins_has_them_released_in_time(
    served: tuple[ServeProcess, Survivor],
) -> None:
    server, survivor = served
    survivor.served_after(4)  # the four prompts are stored
    for round_ in range(scaled(1)):
        scheduler = Engine(server.url, "survivor", role="scheduler")
        survivor.hold_still()
        pinned = server.stats()["pinned_chunks"]
        assert pinned == 0, "the survivor holds no pins between rounds"
        assert scheduler.hold(f"h{round_}", 1, CHUNKS) == CHUNKS * 8
        stats = server.stats()
        assert stats["pinned_chunks"] == pinned + CHUNKS
        survivor.go_on()  # served while the pins are held, and after
        rounds = survivor.rounds
        scheduler.kill()
        killed_at = time.monotonic()
        _released_in_time(server, stats["clients_expired"] + 1, killed_at)
        survivor.served_after(rounds)
        survivor.hold_still()
        assert server.stats()["pinned_chunks"] == pinned
        survivor.go_on()
