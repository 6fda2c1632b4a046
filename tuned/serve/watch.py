"""The engine's watch under make serve's front: a dead llama-server (or one that stops answering its /health) is
noticed, every request waiting on it answered at once, and the engine reaped and started again."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable

import httpx

from tuned.serve.engine import LlamaServer
from tuned.serve.protocol import RequestError


class EngineDown(Exception):
    """The engine died or hung while a request waited on it."""


class EngineWatch:
    """One LlamaServer, its HTTP client, the slots requests hold on it, and its watch: a dead engine (or one that
    stops answering its /health) is noticed, every request waiting on it gets EngineDown (the front answers 503; a
    stream: an error event, then `[DONE]`), `healthy` is False, and the engine is reaped and started again; after
    `max_restarts` failed starts in a row `on_fatal` is called (make serve then exits non-zero).

    Args:
        engine: the started llama-server.
        max_restarts: failed engine starts in a row before giving up.
        hang_after: seconds without an answer to /health before a live engine counts as hung.
    """

    def __init__(self, engine: LlamaServer, max_restarts: int = 3, hang_after: float = 5.0,
                 on_fatal: Callable[[], None] | None = None):
        self.engine, self.max_restarts, self.hang_after, self.on_fatal = engine, max_restarts, hang_after, on_fatal
        self.exit_code, self.restarts, self.down_reason = 0, 0, None
        self.client = self._engine_client()
        self._down: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._watcher: asyncio.Task | None = None

    def _engine_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.engine.url, headers=self.engine.headers, timeout=httpx.Timeout(None),
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self._down = asyncio.Event()
        # at most one engine request a slot: the rest wait here, not in llama-server's HTTP threads (parallel + 4
        # of them), which keeps some free for its /health, so a busy engine is never taken for a hung one
        self._slots = asyncio.Semaphore(self.engine.parallel)
        self._watcher = asyncio.create_task(self._watch())
        try:
            yield
        finally:
            self._watcher.cancel()
            await self.client.aclose()

    @property
    def healthy(self) -> bool:
        return self.down_reason is None

    async def _watch(self, poll: float = 0.2) -> None:
        """Every `poll` s: has the engine exited? Every second: does it answer /health (any answer; llama-server
        answers it from its HTTP threads while its slots decode)? Either failing: `_recover`."""
        last_answer, next_ping = time.monotonic(), 0.0
        while True:
            await asyncio.sleep(poll)
            why = None
            if not self.engine.alive():
                code = self.engine.proc.returncode if self.engine.proc is not None else None
                why = f"exited ({'signal %d' % -code if code is not None and code < 0 else 'code %s' % code})"
            elif time.monotonic() >= next_ping:
                next_ping = time.monotonic() + 1.0
                try:
                    await self.client.get("/health", timeout=1.0)
                    last_answer = time.monotonic()
                except httpx.HTTPError:
                    if time.monotonic() - last_answer >= self.hang_after:
                        why = f"stopped answering for {time.monotonic() - last_answer:.0f} s (hung)"
            if why:
                await self._recover(why)
                last_answer, next_ping = time.monotonic(), 0.0
                if not self.healthy:
                    return

    def _say(self, line: str) -> None:
        print(f"make serve: {line}", file=sys.stderr, flush=True)

    async def _recover(self, why: str) -> None:
        """Marks the engine down (waiting requests get their 503 / error event at once), kills and reaps it, starts
        it again; `max_restarts` failed starts in a row: `on_fatal` with the engine's last lines."""
        self.down_reason = f"the engine {why}"
        self._down.set()
        tail = "\n  ".join(list(self.engine.log)[-10:])
        self._say(f"llama-server {why}; its last lines:\n  {tail}\nrestarting it")
        await asyncio.to_thread(self.engine.kill)
        await self.client.aclose()
        for attempt in range(1, self.max_restarts + 1):
            try:
                await asyncio.to_thread(self.engine.start)
            except (RuntimeError, TimeoutError, OSError) as err:
                self._say(f"restart {attempt} of {self.max_restarts} failed: {str(err)[-2000:]}")
                continue
            self.client = self._engine_client()
            self.restarts += 1
            self._down = asyncio.Event()
            self.down_reason = None
            self._say(f"llama-server restarted (restart {self.restarts}); serving again")
            return
        self.exit_code = 1
        self._say(f"llama-server could not be started again after {self.max_restarts} tries: stopping")
        if self.on_fatal:
            self.on_fatal()

    def _unavailable(self) -> RequestError:
        return RequestError(503, f"The model is unavailable: {self.down_reason or 'the engine stopped'}; it is being "
                                 "restarted, retry in a few seconds.", kind="server_error", code="engine_unavailable")

    async def _on_engine(self, coro, slot: bool = True):
        """Awaits `coro` (a call to the engine; holding a slot unless `slot` is False) unless the engine goes down
        first: then EngineDown."""
        down = self._down
        if down is None or down.is_set():
            coro.close()
            raise EngineDown

        async def call():
            if not slot:
                return await coro
            async with self._slots:
                return await coro

        task, waiter = asyncio.ensure_future(call()), asyncio.ensure_future(down.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not task.done():
            task.cancel()
            raise EngineDown
        try:
            return task.result()
        except httpx.HTTPError as err:  # the connection broke: it died under us
            raise EngineDown from err

    async def aclose(self) -> None:
        await self.client.aclose()
