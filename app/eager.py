"""Start a task by running its first step now, in the caller's callback (Python 3.12's eager tasks, for 3.11).

A task made by ``loop.create_task`` runs its first step on a later pass of the event loop, after every other
callback that is ready by then.  For a request that arrives in a burst that is a long wait: the relays of the other
streams' tokens, read in the same pass, all go first (at 256 streams, 6–10 ms of them).  Started eagerly, a request
runs until its first real wait — for a generation request, the upstream request written to the worker — inside
the callback that parsed it.

The price: a request run to its upstream write inside the read callback interleaves the parser's, the handler's and
the worker connection's code request by request, where tasks run each phase for a whole burst in turn (warm caches,
and the worker woken once for a burst's requests). At saturation (every loop pass bringing ~30 requests) eager
starts for all cost ~35 % more CPU per request. So a ``PassBudget`` lets the first few requests of each loop pass
start eagerly — all of them when traffic is light or merely bursty — and the rest of a pass start as tasks.

How: the task is created around a ``_Continuation`` of the coroutine; the coroutine's first step runs at once, as
that task (``current_task()`` is the task, in the task's context); the task's own first step then hands the task
what the coroutine waits on (or its result), and passes every later step through.  A task cancelled before its own
first step (the client left within the same loop pass) cancels what the coroutine waits on and waits for it, as
``Task.cancel()`` does.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

_NOTHING: Any = object()


class _Continuation(Coroutine[Any, Any, T]):
    """The coroutine, already past its first step: what that step yielded (or how it ended) comes first."""

    __slots__ = ("_coro", "_yielded", "_result", "_error", "_ended")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._yielded: Any = _NOTHING
        self._result: Any = None
        self._error: BaseException | None = None
        self._ended = False

    def first_step(self) -> None:
        try:
            self._yielded = self._coro.send(None)
        except StopIteration as stop:
            self._ended = True
            self._result = stop.value
        except BaseException as exc:  # the task's to raise, from its own first step
            self._ended = True
            self._error = exc

    def send(self, value: Any) -> Any:
        if self._ended:
            self._ended = False
            error, self._error = self._error, None
            if error is not None:
                raise error
            raise StopIteration(self._result)
        yielded = self._yielded
        if yielded is not _NOTHING:
            self._yielded = _NOTHING
            return yielded
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        yielded = self._yielded
        if yielded is not _NOTHING:  # cancelled before the task's first step: the coroutine waits on this
            self._yielded = _NOTHING
            if isinstance(yielded, asyncio.Future) and yielded.cancel():
                return yielded  # as Task.cancel() does: what it waits on is cancelled, and the task waits for that
        if self._ended:  # (nothing left to throw into)
            self._ended = False
            raise typ if val is None else val
        if val is None:
            return self._coro.throw(typ)
        return self._coro.throw(val)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        raise TypeError("a _Continuation is driven by its task only")  # pragma: no cover

    # what debuggers, Task.get_stack() and repr() read of a coroutine: the wrapped one's
    @property
    def cr_frame(self) -> Any:
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_code(self) -> Any:
        return getattr(self._coro, "cr_code", None)

    @property
    def cr_await(self) -> Any:
        return getattr(self._coro, "cr_await", None)

    @property
    def cr_running(self) -> bool:
        return bool(getattr(self._coro, "cr_running", False))


def start_eager(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T],
                context: contextvars.Context | None = None) -> asyncio.Task[T]:
    """A task for ``coro`` whose first step has already run (see the module's docstring), when called from a plain
    callback of the running ``loop`` (a protocol's ``data_received``); from inside a task (a test feeding a protocol
    by hand), or with a task factory installed, a task like any other."""
    ctx = context if context is not None else contextvars.copy_context()
    if asyncio.current_task(loop) is not None or loop.get_task_factory() is not None:
        # (a task factory — tracing, monitoring — may wrap the coroutine in its own: give it the plain one)
        return loop.create_task(coro, context=ctx)
    cont: _Continuation[T] = _Continuation(coro)
    task = loop.create_task(cont, context=ctx)
    asyncio.tasks._enter_task(loop, task)
    try:
        ctx.run(cont.first_step)
    finally:
        asyncio.tasks._leave_task(loop, task)
    return task


class PassBudget:
    """At most ``per_pass`` eager starts in one pass of the event loop (its I/O callbacks, up to its ready queue)."""

    __slots__ = ("per_pass", "_used", "_loop", "_armed")

    def __init__(self, per_pass: int) -> None:
        self.per_pass = per_pass
        self._used = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._armed = False

    def take(self, loop: asyncio.AbstractEventLoop) -> bool:
        if loop is not self._loop:  # (a process that runs more than one loop in turn: tests)
            self._loop, self._used, self._armed = loop, 0, False
        if not self._armed:
            self._armed = True
            loop.call_soon(self._reset)  # runs after this pass's I/O callbacks
        if self._used >= self.per_pass:
            return False
        self._used += 1
        return True

    def _reset(self) -> None:
        self._used = 0
        self._armed = False
