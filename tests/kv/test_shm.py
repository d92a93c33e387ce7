"""Shared memory for CPU KV tensors: allocation, refs, mapping in another process, lifetime."""

from __future__ import annotations

import gc
import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import torch

from kvrpc.errors import KVConfigError, KVError, NotSharedMemory
from kvrpc.kv.shm import (
    MemoryOwner,
    SharedTensorRef,
    open_shared,
    release_shared,
    remove_if_orphaned,
    shared_empty,
    shared_ref,
)

SHM = "/dev/shm"


def path_of(tensor: torch.Tensor) -> str:
    return os.path.join(SHM, shared_ref(tensor).name)


@pytest.fixture
def shared() -> Iterator[torch.Tensor]:
    """A 4 x 1000 float32 shared tensor, released after the test."""
    tensor = shared_empty((4, 1000), torch.float32)
    path = path_of(tensor)
    yield tensor
    if os.path.exists(path):
        release_shared(tensor)


def pattern(numel: int, seed: int) -> torch.Tensor:
    """Random bytes that any process regenerates from the seed alone."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=generator)


def python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; it must exit 0."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


PATTERN_SOURCE = """
import torch
def pattern(numel, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=generator)
"""


def test_another_process_reads_and_writes_a_tensor_this_process_shared(
    shared: torch.Tensor,
) -> None:
    raw = shared.view(-1).view(torch.uint8)
    raw.copy_(pattern(raw.numel(), seed=1))
    ref = shared_ref(shared[1:3])
    code = (
        PATTERN_SOURCE
        + f"""
from kvrpc.kv.shm import SharedTensorRef, open_shared
ref = SharedTensorRef.from_wire({ref.to_wire()!r})
with open_shared(ref) as mapping:
    raw = mapping.tensor.view(-1).view(torch.uint8)
    assert torch.equal(raw, pattern(16000, seed=1)[4000:12000]), "child saw other bytes"
    raw.copy_(pattern(raw.numel(), seed=2))
"""
    )

    python(code)

    assert torch.equal(raw[4000:12000], pattern(8000, seed=2))
    assert torch.equal(raw[:4000], pattern(16000, seed=1)[:4000])
    assert torch.equal(raw[12000:], pattern(16000, seed=1)[12000:])


def test_this_process_reads_and_writes_a_tensor_another_process_shared() -> None:
    code = (
        PATTERN_SOURCE
        + """
import json, sys
from kvrpc.kv.shm import shared_empty, shared_ref
tensor = shared_empty((3, 100), torch.bfloat16)
raw = tensor.view(-1).view(torch.uint8)
raw.copy_(pattern(raw.numel(), seed=3))
print(json.dumps(shared_ref(tensor).to_wire()), flush=True)
sys.stdin.readline()
print("same" if torch.equal(raw, pattern(raw.numel(), seed=4)) else "different", flush=True)
"""
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        ref = SharedTensorRef.from_wire(json.loads(child.stdout.readline()))
        with open_shared(ref) as mapping:
            tensor = mapping.tensor
            assert tensor.shape == (3, 100) and tensor.dtype == torch.bfloat16
            raw = tensor.view(-1).view(torch.uint8)
            assert torch.equal(raw, pattern(600, seed=3))
            raw.copy_(pattern(600, seed=4))
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "same"
    finally:
        child.stdin.close()
        child.stdout.close()
        child.wait(timeout=60)


def test_shared_ref_of_a_view_inside_gives_its_byte_offset(shared: torch.Tensor) -> None:
    ref = shared_ref(shared[2, 10:20])
    assert ref.name == os.path.basename(path_of(shared))
    assert (ref.offset, ref.shape, ref.dtype) == ((2 * 1000 + 10) * 4, (10,), "float32")

    shared[2, 10:20] = torch.arange(10, dtype=torch.float32)
    with open_shared(ref) as mapping:
        assert torch.equal(mapping.tensor, torch.arange(10, dtype=torch.float32))


def test_plain_tensor_is_not_shared_memory_and_the_error_names_shared_empty() -> None:
    with pytest.raises(NotSharedMemory, match=r"not allocated by kvrpc\.kv\.shared_empty"):
        shared_ref(torch.empty(4, 1000))


def test_non_contiguous_view_is_refused_naming_shared_empty(shared: torch.Tensor) -> None:
    with pytest.raises(NotSharedMemory, match=r"not contiguous.*kvrpc\.kv\.shared_empty"):
        shared_ref(shared[:, ::2])


def test_released_tensor_can_no_longer_be_shared(shared: torch.Tensor) -> None:
    path = path_of(shared)
    release_shared(shared)
    assert not os.path.exists(path)
    shared.fill_(1.0)  # still mapped here
    assert float(shared.sum()) == 4000.0
    with pytest.raises(NotSharedMemory, match="shared_empty"):
        shared_ref(shared)


def test_garbage_collecting_the_tensor_keeps_the_file() -> None:
    tensor = shared_empty((10,), torch.int64)
    path = path_of(tensor)
    del tensor
    gc.collect()
    try:
        assert os.path.exists(path)
    finally:
        os.unlink(path)


def test_open_shared_of_a_missing_name_says_the_worker_may_have_exited() -> None:
    ref = SharedTensorRef("kvrpc-1-0000000000000000", 0, (4,), "float16")
    with pytest.raises(KVError, match="worker that registered it may have exited"):
        open_shared(ref)


@pytest.mark.parametrize(
    "name", ["../kvrpc-1-ab", "kvrpc-1/../../etc/passwd", "kvrpc-..", "psm_1234", "", 7]
)
def test_names_outside_kvrpc_shared_memory_are_refused(name: object) -> None:
    with pytest.raises(KVError, match="not a kvrpc shared-memory name"):
        open_shared(SharedTensorRef(name, 0, (4,), "float16"))  # type: ignore[arg-type]


def test_ref_past_the_end_of_the_file_is_refused(shared: torch.Tensor) -> None:
    name = shared_ref(shared).name
    with pytest.raises(KVError, match="too few"):
        open_shared(SharedTensorRef(name, 8, (4, 1000), "float32"))


def test_file_is_removed_when_the_creating_process_exits() -> None:
    code = """
import torch
from kvrpc.kv.shm import shared_empty, shared_ref
tensor = shared_empty((1000,), torch.float16)
print(shared_ref(tensor).name)
"""
    name = python(code).stdout.strip()
    assert name.startswith("kvrpc-")
    assert not os.path.exists(os.path.join(SHM, name))


def test_a_forked_child_exiting_leaves_its_parents_files() -> None:
    code = """
import os, sys, torch
from kvrpc.kv.shm import shared_empty, shared_ref
path = "/dev/shm/" + shared_ref(shared_empty((100,), torch.uint8)).name
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a normal exit: atexit hooks run in the child
os.waitpid(pid, 0)
print("kept" if os.path.exists(path) else "removed")
"""
    assert python(code).stdout.strip() == "kept"


def test_file_is_private_to_its_user(shared: torch.Tensor) -> None:
    assert stat.S_IMODE(os.stat(path_of(shared)).st_mode) == 0o600


def test_closing_a_mapping_keeps_tensors_taken_from_it_usable(shared: torch.Tensor) -> None:
    mapping = open_shared(shared_ref(shared))
    taken = mapping.tensor[1]
    mapping.close()
    gc.collect()

    taken.fill_(3.0)

    assert torch.equal(shared[1], torch.full((1000,), 3.0))
    assert mapping.closed
    with pytest.raises(KVError, match="closed"):
        _ = mapping.tensor


def test_memory_is_unmapped_once_the_last_tensor_of_a_closed_mapping_is_freed(
    shared: torch.Tensor,
) -> None:
    name = shared_ref(shared).name
    shared_path = os.path.join(SHM, name)

    def mapped_count() -> int:
        with open("/proc/self/maps") as maps:
            return sum(shared_path in line for line in maps)

    before = mapped_count()
    mapping = open_shared(shared_ref(shared))
    taken = mapping.tensor
    mapping.close()
    assert mapped_count() == before + 1
    del taken
    gc.collect()
    assert mapped_count() == before


def test_shared_empty_refuses_an_empty_shape() -> None:
    with pytest.raises(KVConfigError, match="empty tensor"):
        shared_empty((0, 16), torch.float16)


def test_shared_empty_gives_the_shape_and_dtype_asked_for() -> None:
    tensor = shared_empty([2, 3, 8], torch.float8_e4m3fn)
    try:
        assert tensor.shape == (2, 3, 8) and tensor.dtype == torch.float8_e4m3fn
        assert tensor.is_contiguous() and tensor.device.type == "cpu"
    finally:
        release_shared(tensor)


def test_ref_survives_the_wire(shared: torch.Tensor) -> None:
    ref = shared_ref(shared[1:])
    wire = ref.to_wire()
    assert wire == {"name": ref.name, "offset": 4000, "shape": [3, 1000], "dtype": "float32"}
    assert SharedTensorRef.from_wire(wire) == ref


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"offset": -4}, "non-negative int"),
        ({"offset": 2}, "not a multiple of its 4-byte elements"),
        ({"shape": [0, 3]}, "tuple of positive ints"),
        ({"shape": 3}, "must be a list"),
        ({"dtype": "float99"}, "unknown KV dtype"),
        ({"extra": True}, "exactly the keys"),
    ],
)
def test_malformed_ref_from_the_wire_is_refused(
    shared: torch.Tensor, change: dict[str, object], message: str
) -> None:
    with pytest.raises(KVError, match=message):
        SharedTensorRef.from_wire({**shared_ref(shared).to_wire(), **change})


def _sharing_child() -> tuple[subprocess.Popen[str], SharedTensorRef]:
    """A process that shares a tensor and then waits, to be killed: it and its tensor's ref."""
    code = """
import json, sys, torch
from kvrpc.kv.shm import shared_empty, shared_ref
tensor = shared_empty((4, 64), torch.float16)
print(json.dumps(shared_ref(tensor).to_wire()), flush=True)
sys.stdin.readline()
"""
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    return child, SharedTensorRef.from_wire(json.loads(child.stdout.readline()))


def test_a_killed_makers_file_is_removed_by_whoever_mapped_it_and_a_live_makers_is_kept() -> None:
    child, ref = _sharing_child()
    path = os.path.join(SHM, ref.name)
    try:
        mapping = open_shared(ref, MemoryOwner(os.geteuid(), child.pid))
        assert not remove_if_orphaned(mapping), "the maker runs: its file stays"
        assert os.path.exists(path)
        child.kill()  # SIGKILL: no exit handler removes the file
        child.wait(timeout=60)
        assert os.path.exists(path)
        assert remove_if_orphaned(mapping)
        assert not os.path.exists(path)
        assert torch.equal(mapping.tensor, torch.zeros(4, 64, dtype=torch.float16)), "still mapped"
        assert not remove_if_orphaned(mapping), "removed once"
    finally:
        child.kill()
        child.wait(timeout=60)
        if os.path.exists(path):
            os.unlink(path)


def test_a_file_whose_maker_was_not_identified_or_that_was_replaced_is_never_removed() -> None:
    child, ref = _sharing_child()
    path = os.path.join(SHM, ref.name)
    try:
        unidentified = open_shared(ref, MemoryOwner(os.geteuid(), None))  # as over zmq+ipc
        identified = open_shared(ref, MemoryOwner(os.geteuid(), child.pid))
        child.kill()
        child.wait(timeout=60)
        assert not remove_if_orphaned(unidentified)
        os.unlink(path)
        with open(path, "wb") as other:  # another file now holds the name
            other.write(b"\0" * 512)
        assert not remove_if_orphaned(identified)
        assert os.path.exists(path)
    finally:
        child.kill()
        child.wait(timeout=60)
        if os.path.exists(path):
            os.unlink(path)
