"""RequestHandle: what submit() gives back at once. The step loop pushes Deltas into it from its own
thread; callers read them with a sync or an async iterator, wait for the Result, or cancel."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, List, Optional

from loramux.serving.request import Delta, Result


class RequestHandle:
    """One submitted request. Thread-safe: the loop writes, any thread or event loop reads. Every
    iterator replays the request's deltas from the first one, so a late reader misses nothing."""

    def __init__(self, request_id: int, task_id: Optional[int], on_cancel: Callable[["RequestHandle"], None]):
        self.request_id = request_id
        self._task_id = task_id
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._deltas: List[Delta] = []
        self._result: Optional[Result] = None
        self._cancel_requested = False
        # (event loop, future) of async readers waiting for the next delta
        self._waiters: List[tuple] = []

    # --- written by the step loop ------------------------------------------------------------------
    def _push(self, delta: Delta) -> None:
        with self._cond:
            self._deltas.append(delta)
            self._wake()

    def _finish(self, result: Result) -> None:
        with self._cond:
            if self._result is None:
                self._result = result
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # that event loop is closed: nobody is waiting there any more
                pass

    # --- read by callers ---------------------------------------------------------------------------
    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def cancel(self) -> None:
        """Asks the loop to stop this request: its KV memory and adapter hold are released at the
        next step; the Result keeps the tokens made so far (finish_reason "cancelled")."""
        with self._cond:
            if self._result is not None or self._cancel_requested:
                return
            self._cancel_requested = True
        self._on_cancel(self)

    def done(self) -> bool:
        return self._result is not None

    def result(self, timeout: Optional[float] = None) -> Result:
        """Waits for the request to end; raises TimeoutError after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            return self._result

    def __iter__(self):
        index = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: index < len(self._deltas) or self._result is not None)
                pending = self._deltas[index:]
                finished = self._result is not None
            for delta in pending:
                yield delta
            index += len(pending)
            if finished and index == len(self._deltas):
                return

    async def _next_batch(self, index: int):
        """Deltas from `index` on, waiting (without blocking the event loop) until there is one or
        the request has ended."""
        while True:
            loop = asyncio.get_running_loop()
            with self._cond:
                if index < len(self._deltas) or self._result is not None:
                    return self._deltas[index:], self._result is not None
                future = loop.create_future()
                self._waiters.append((loop, future))
            await future

    def __aiter__(self):
        return self._async_deltas()

    async def _async_deltas(self):
        index = 0
        while True:
            pending, finished = await self._next_batch(index)
            for delta in pending:
                yield delta
            index += len(pending)
            if finished and index == len(self._deltas):
                return

    def __repr__(self) -> str:
        state = "done" if self.done() else ("cancelling" if self._cancel_requested else "running")
        return f"RequestHandle(request_id={self.request_id}, task_id={self._task_id}, {state})"


def _resolve(future) -> None:
    if not future.done():
        future.set_result(None)


__all__ = ["RequestHandle"]
