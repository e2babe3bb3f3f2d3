"""Reading jobs' events: server-sent events or one collected reply, with one disconnect mechanism.

Both ways watch the ASGI ``receive`` channel for ``http.disconnect`` while the jobs run (or
still wait in the queue), and cancel every job of the request as soon as the client leaves, so
their slots and queue places are freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from .engine import Event, Job

log = logging.getLogger("ggufrun.server")
T = TypeVar("T")


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class JobGroup:
    """The jobs of one request (``n`` choices, or one per prompt), cancelled together."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    @property
    def cancelled(self) -> bool:
        return any(job.cancelled for job in self.jobs)


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def merged(group: JobGroup) -> AsyncGenerator[tuple[int, Event], None]:
    """(job index, event) in arrival order, until every job has sent its terminal event."""
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(i: int, job: Job) -> None:
        while True:
            event = await job.events.get()
            await queue.put((i, event))
            if event.kind != "text":
                return

    tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(group.jobs)]
    try:
        open_jobs = len(tasks)
        while open_jobs:
            i, event = await queue.get()
            if event.kind != "text":
                open_jobs -= 1
            yield i, event
    finally:
        for task in tasks:
            task.cancel()


class EventStream:
    """A server-sent-events response that cancels its jobs as soon as the client goes away:
    a watcher sees ``http.disconnect`` even while a job still waits in the queue."""

    def __init__(self, group: JobGroup, chunks: AsyncIterator[bytes], media_type: str = "text/event-stream; charset=utf-8") -> None:
        self.group = group
        self.chunks = chunks
        self.media_type = media_type.encode()  # Ollama streams NDJSON through the same path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(wait_disconnect(receive))
        watcher.add_done_callback(lambda _: self.group.cancel())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", self.media_type), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            async for chunk in self.chunks:
                if self.group.cancelled:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send
            log.info("client disconnected mid-stream")
        finally:
            self.group.cancel()  # no-op for jobs that already ended; frees the slots otherwise
            watcher.cancel()
            await self.chunks.aclose()  # type: ignore[attr-defined]


@dataclass
class Collected:
    """One job's whole reply."""

    text: str = ""
    tokens: list[Any] = field(default_factory=list)  # engine TokenInfo, when logprobs were asked for
    done: Event | None = None


async def _gather(group: JobGroup) -> list[Collected]:
    """Every job's whole reply, read in this one task; an error event raises its error."""
    results = [Collected() for _ in group.jobs]
    parts: list[list[str]] = [[] for _ in group.jobs]
    async with contextlib.aclosing(merged(group)) as events:
        async for i, event in events:
            if event.kind == "text":
                parts[i].append(event.text)
                results[i].tokens.extend(getattr(event, "tokens", None) or ())
            elif event.kind == "done":
                results[i].done = event
            else:
                assert event.error is not None
                raise event.error
    for r, p in zip(results, parts):
        r.text = "".join(p)
    return results


async def collect(request: Request, group: JobGroup) -> list[Collected] | None:
    """Every job's whole reply; None (and the jobs cancelled) if the client left first.
    An error event raises its error."""
    return await unless_gone(request, group, _gather(group))


async def unless_gone(request: Request, group: JobGroup, work: Awaitable[T]) -> T | None:
    """``work``'s result (it reads ``group``'s events), or None with the jobs cancelled when the
    client leaves first. ``work``'s error is raised."""
    # The events are read to the end in a task of their own, raced against the disconnect
    # watcher: the reader is cancelled as a whole, never an async generator closed while another
    # task is inside it (that raised "aclose(): asynchronous generator is already running").
    reader = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(request.receive))
    watcher.add_done_callback(_retrieve)
    try:
        await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if reader.done():
            return reader.result()
        log.info("client disconnected before the reply was complete")
        return None
    finally:
        group.cancel()  # a no-op once the jobs ended; frees the slots when the client left or this task was cancelled
        watcher.cancel()
        if not reader.done():
            reader.cancel()
            reader.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a task's outcome as seen: a reader dropped after its client left, or a watcher whose
    channel failed, has nobody to tell."""
    if not task.cancelled():
        task.exception()
