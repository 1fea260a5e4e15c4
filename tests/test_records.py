"""Records (section 8): the ids the server makes for new rows."""

import os
import uuid

import pytest

import prefectlite


def test_new_ids_are_distinct_version_4_uuids_across_many_refills_of_the_random_pool():
    ids = [prefectlite.new_id() for _ in range(3000)]  # 48 KB of randomness: the 4 KB pool refills ~12 times
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_random_bytes_larger_than_the_pool_are_served_whole():
    first, second = prefectlite._random_bytes(10_000), prefectlite._random_bytes(10_000)
    assert len(first) == len(second) == 10_000 and first != second


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_repeat_the_parents_ids():
    prefectlite.new_id()  # the pool now holds unused bytes the child would inherit
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        try:
            os.write(write_end, prefectlite.new_id().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    parent_next = prefectlite.new_id()
    child_next = os.read(read_end, 100).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    uuid.UUID(child_next)
    assert child_next != parent_next
