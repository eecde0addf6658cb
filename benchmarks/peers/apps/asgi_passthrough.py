"""``asgi-passthrough``: a pure-ASGI middleware that wraps ``send`` and does nothing else.

The least any middleware that acts before the response starts must cost (``/nodb`` only).
"""

from __future__ import annotations

from typing import Any

from ._common import new_app


class PassThrough:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_wrapper(message: Any) -> None:
            await send(message)

        await self.app(scope, receive, send_wrapper)


app = new_app()
app.add_middleware(PassThrough)
