"""app.eager: a task whose first step runs in the callback that starts it."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from app.eager import PassBudget, start_eager


def on_both_loops(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run the test on asyncio's loop and on uvloop (the gateway's): eager starts use asyncio's task registry."""
    @functools.wraps(test)
    def run() -> None:
        for runner in (asyncio.run, uvloop.run):
            LOG.clear()
            runner(test())
    return run


VAR: contextvars.ContextVar[str | None] = contextvars.ContextVar("VAR", default=None)


async def from_callback(make: Callable[[], Coroutine[Any, Any, Any]], context: contextvars.Context | None = None,
                        *, cancel: bool = False) -> tuple[asyncio.Task[Any], list[str]]:
    """Start ``make()`` eagerly from a plain loop callback (as a protocol's data_received would) — and with
    ``cancel``, cancel it in the same callback, before the task's own first step. Returns the task and what the log
    held when start_eager returned."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[tuple[asyncio.Task[Any], list[str]]] = loop.create_future()

    def callback() -> None:
        task = start_eager(loop, make(), context)
        seen = list(LOG)
        if cancel:
            task.cancel()
        started.set_result((task, seen))

    loop.call_soon(callback)
    return await started


LOG: list[str] = []


@on_both_loops
async def test_first_step_runs_before_start_eager_returns_and_the_rest_in_the_task() -> None:
    async def work() -> int:
        LOG.append("first step")
        await asyncio.sleep(0.01)
        LOG.append("second step")
        return 42

    task, seen_at_return = await from_callback(work)
    assert seen_at_return == ["first step"]
    assert not task.done()
    assert await task == 42
    assert LOG == ["first step", "second step"]


@on_both_loops
async def test_current_task_is_the_task_during_the_first_step() -> None:
    seen: list[asyncio.Task[Any] | None] = []

    async def work() -> None:
        seen.append(asyncio.current_task())
        await asyncio.sleep(0)
        seen.append(asyncio.current_task())

    task, _ = await from_callback(work)
    await task
    assert seen == [task, task]


@on_both_loops
async def test_the_first_step_runs_in_the_tasks_context() -> None:
    ctx = contextvars.copy_context()

    async def work() -> str | None:
        VAR.set("set in the first step")
        await asyncio.sleep(0)
        return VAR.get()

    task, _ = await from_callback(work, ctx)
    assert await task == "set in the first step"
    assert ctx[VAR] == "set in the first step"
    assert VAR.get() is None  # not leaked into the caller's context


@on_both_loops
async def test_a_coroutine_that_ends_in_its_first_step() -> None:
    async def quick() -> str:
        return "done"

    task, _ = await from_callback(quick)
    assert await task == "done"


@on_both_loops
async def test_an_exception_in_the_first_step_is_the_tasks() -> None:
    async def broken() -> None:
        raise ValueError("bad input")

    task, _ = await from_callback(broken)
    with pytest.raises(ValueError, match="bad input"):
        await task


@on_both_loops
async def test_cancelled_before_its_own_first_step_the_coroutine_sees_the_cancellation() -> None:
    loop = asyncio.get_running_loop()
    waited_on: list[asyncio.Future[None]] = []

    async def waits() -> None:
        fut: asyncio.Future[None] = loop.create_future()
        waited_on.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            LOG.append("cancelled where it waited")
            raise
        finally:
            LOG.append("cleaned up")

    task, _ = await from_callback(waits, cancel=True)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert LOG == ["cancelled where it waited", "cleaned up"]
    assert waited_on[0].cancelled()  # what it waited on is cancelled too, as Task.cancel() does


@on_both_loops
async def test_cancelled_later_like_any_task() -> None:
    async def waits() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            LOG.append("cleaned up")

    task, _ = await from_callback(waits)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert LOG == ["cleaned up"]


@on_both_loops
async def test_from_inside_a_task_it_is_an_ordinary_task() -> None:
    async def work() -> str:
        LOG.append("ran")
        return "ok"

    task = start_eager(asyncio.get_running_loop(), work())
    assert LOG == []  # not run here: this test is itself a task
    assert await task == "ok"


@on_both_loops
async def test_the_pass_budget_allows_so_many_eager_starts_per_loop_pass() -> None:
    loop = asyncio.get_running_loop()
    budget = PassBudget(2)
    passes: list[list[bool]] = []
    done: asyncio.Future[None] = loop.create_future()

    def one_pass(n: int, last: bool) -> None:
        passes.append([budget.take(loop) for _ in range(n)])
        if last:
            loop.call_soon(done.set_result, None)

    loop.call_soon(one_pass, 3, False)  # a pass with three requests: the third starts as a task
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    loop.call_soon(one_pass, 1, True)  # the next pass has its own budget
    await done
    assert passes == [[True, True, False], [True]]


def test_the_pass_budget_starts_afresh_on_another_loop() -> None:
    budget = PassBudget(1)
    first = asyncio.new_event_loop()
    try:
        assert budget.take(first) and not budget.take(first)  # the loop is closed before its pass ends
    finally:
        first.close()
    second = asyncio.new_event_loop()
    try:
        assert budget.take(second)
    finally:
        second.close()


@on_both_loops
async def test_with_a_task_factory_installed_it_is_an_ordinary_task() -> None:
    loop = asyncio.get_running_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        async def traced() -> Any:  # what tracing tools do: await the coroutine inside their own
            LOG.append("traced")
            return await coro
        return asyncio.Task(traced(), loop=loop, **kwargs)

    async def work() -> str:
        return "ok"

    loop.set_task_factory(factory)
    try:
        task, _ = await from_callback(work)
        assert await task == "ok"
        assert LOG == ["traced"]  # the factory got the plain coroutine, and awaited it
    finally:
        loop.set_task_factory(None)


@on_both_loops
async def test_an_eager_tasks_stack_shows_where_it_waits() -> None:
    async def waits_here() -> None:
        await asyncio.sleep(10)

    task, _ = await from_callback(waits_here)
    await asyncio.sleep(0.01)
    assert any(frame.f_code.co_name == "waits_here" for frame in task.get_stack())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@on_both_loops
async def test_cancelled_before_its_own_first_step_it_waits_for_an_awaited_task_to_end() -> None:
    loop = asyncio.get_running_loop()
    inner_tasks: list[asyncio.Task[None]] = []

    async def outer() -> None:
        inner_tasks.append(loop.create_task(asyncio.sleep(10)))
        try:
            await inner_tasks[0]
        finally:
            LOG.append(f"outer cleaned up, inner done: {inner_tasks[0].done()}")

    task, _ = await from_callback(outer, cancel=True)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert LOG == ["outer cleaned up, inner done: True"]  # as Task.cancel(): the awaited task is cancelled first
    assert inner_tasks[0].cancelled()
