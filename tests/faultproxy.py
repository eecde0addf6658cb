"""A TCP proxy between a driver and a real database server that breaks connections on command.

``FaultProxy`` listens on 127.0.0.1 (random port) and forwards every connection to the
server. A test can

- ``cut()``: close every connection abruptly, both sides (the driver sees a reset, the
  server a vanished client);
- ``stall()`` / ``resume()``: stop forwarding in both directions on every open
  connection while holding the sockets open, then go on;
- ``arm(pattern, action)``: act when a client-to-server packet matches ``pattern``, at
  that exact moment: ``"cut"`` or ``"stall"`` before the packet is forwarded (the server
  never sees it), ``"cut_after"`` or ``"stall_after"`` once it is forwarded (the server
  is running it). A triggered stall holds only the connection that sent the packet.
  ``triggered`` is set then. ``COMMIT`` matches a PostgreSQL simple
  query (``Q``), an extended-protocol Parse (``P``) or a MySQL ``COM_QUERY`` whose text
  starts with ``COMMIT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

from sqlalchemy import make_url

# PostgreSQL: 'Q' + int32 length + text; 'P' + int32 length + statement name + NUL + text.
# MySQL: 3-byte length + sequence id + 0x03 (COM_QUERY) + text.
COMMIT = re.compile(rb"(?:Q.{4}|P.{4}[^\x00]*\x00|\x03)\s*COMMIT\b", re.IGNORECASE | re.DOTALL)

_ACTIONS = ("cut", "stall", "cut_after", "stall_after")


class FaultProxy:
    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self.connections = 0  # accepted so far
        self.triggered = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: list[asyncio.Event] = []  # one "flowing" switch per connection
        self._armed: tuple[re.Pattern[bytes], str] | None = None

    # -- commands ------------------------------------------------------------------------------

    def arm(self, pattern: re.Pattern[bytes] | bytes, action: str) -> None:
        assert action in _ACTIONS, action
        compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        self._armed = (compiled, action)
        self.triggered.clear()

    def disarm(self) -> None:
        self._armed = None

    def stall(self) -> None:
        """Stop forwarding on every open connection (new connections still flow)."""
        for flowing in self._links:
            flowing.clear()

    def resume(self) -> None:
        for flowing in self._links:
            flowing.set()

    def cut(self) -> None:
        """Abort every connection now (RST where the OS allows it), both sides."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def url(self, server_url: str) -> str:
        """``server_url`` pointed at this proxy."""
        url = make_url(server_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    # -- plumbing ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.disarm()
        self.resume()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, server_w}
        flowing = asyncio.Event()
        flowing.set()
        self._links.append(flowing)
        pumps = [
            asyncio.create_task(self._pump(client_r, server_w, flowing, inspect=True)),
            asyncio.create_task(self._pump(server_r, client_w, flowing, inspect=False)),
        ]
        self._tasks.update(pumps)
        for pump in pumps:
            pump.add_done_callback(self._tasks.discard)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for writer in (client_w, server_w):  # one side closed: close the other abruptly too
            writer.transport.abort()
            self._writers.discard(writer)
        for pump in pumps:
            pump.cancel()
        self._links.remove(flowing)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        flowing: asyncio.Event,
        *,
        inspect: bool,
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await flowing.wait()
                after = None
                if inspect and self._armed is not None and self._armed[0].search(data):
                    action = self._armed[1]
                    self._armed = None
                    if action.endswith("_after"):
                        after = action.removesuffix("_after")
                    else:
                        self._act(action, flowing)
                        if action == "cut":
                            return
                        await flowing.wait()
                if writer.transport.is_closing():
                    return
                writer.write(data)
                await writer.drain()
                if after is not None:
                    self._act(after, flowing)

    def _act(self, action: str, flowing: asyncio.Event) -> None:
        if action == "cut":
            self.cut()
        else:
            flowing.clear()  # this connection only: a driver's cancel request still gets through
        self.triggered.set()


@contextlib.asynccontextmanager
async def fault_proxy(server_url: str) -> AsyncIterator[FaultProxy]:
    url = make_url(server_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or _default_port(url.get_backend_name()))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def _default_port(backend: str) -> int:
    return 5432 if backend == "postgresql" else 3306
