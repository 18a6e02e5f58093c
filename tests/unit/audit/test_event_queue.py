"""The audit writer's queue: batches, the count of handled events, and room."""

from __future__ import annotations

import asyncio

import pytest

from moorage.audit.events import AuditEvent
from moorage.audit.log import _EventQueue


def _events(count: int) -> list[AuditEvent]:
    return [AuditEvent("manifest.pull", reference=str(n)) for n in range(count)]


async def test_event_queue_takes_batches_in_order() -> None:
    """A batch holds at most the limit, oldest events first."""
    queue = _EventQueue(10)
    events = _events(5)
    for event in events:
        queue.put_nowait(event)
    assert await queue.get_batch(3) == events[:3]
    assert queue.take(10) == events[3:]
    assert queue.take(10) == []
    assert queue.qsize() == 0


async def test_event_queue_full_raises() -> None:
    """put_nowait on a full queue raises QueueFull, as asyncio.Queue does."""
    queue = _EventQueue(2)
    queue.put_nowait(AuditEvent("a.b"))
    queue.put_nowait(AuditEvent("a.b"))
    assert queue.full()
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(AuditEvent("a.b"))


async def test_event_queue_get_waits_for_event() -> None:
    """get_batch waits on an empty queue until an event is put."""
    queue = _EventQueue(10)
    getter = asyncio.create_task(queue.get_batch(5))
    await asyncio.sleep(0)
    assert not getter.done()
    event = AuditEvent("manifest.pull")
    queue.put_nowait(event)
    assert await asyncio.wait_for(getter, 1) == [event]


async def test_event_queue_put_waits_for_room() -> None:
    """put on a full queue returns once a batch was taken."""
    queue = _EventQueue(1)
    first, second = _events(2)
    queue.put_nowait(first)
    putter = asyncio.create_task(queue.put(second))
    await asyncio.sleep(0)
    assert not putter.done()
    assert queue.take(1) == [first]
    await asyncio.wait_for(putter, 1)
    assert queue.take(1) == [second]


async def test_event_queue_join_waits_for_task_done() -> None:
    """join returns once every event put was marked done, in batches or one by one."""
    queue = _EventQueue(10)
    for event in _events(3):
        queue.put_nowait(event)
    joiner = asyncio.create_task(queue.join())
    queue.take(3)
    queue.task_done(2)
    await asyncio.sleep(0)
    assert not joiner.done()
    queue.task_done()
    await asyncio.wait_for(joiner, 1)


async def test_event_queue_task_done_past_count_raises() -> None:
    """Marking more events done than were put is a bug, as in asyncio.Queue."""
    queue = _EventQueue(10)
    queue.put_nowait(AuditEvent("a.b"))
    with pytest.raises(ValueError, match="more times"):
        queue.task_done(2)
