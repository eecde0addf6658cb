"""``context-async-sqlalchemy-asgi``: ``context_async_sqlalchemy.py`` with the library's
pure-ASGI middleware, ``app.add_middleware(ASGIHTTPDBSessionMiddleware)`` (as its
``fastapi_with_pure_asgi_example`` does). It commits when the app call has returned, i.e.
after the response has been sent.
"""

from context_async_sqlalchemy import ASGIHTTPDBSessionMiddleware

from ._common import new_app
from .context_async_sqlalchemy import add_routes, lifespan

app = add_routes(new_app(lifespan=lifespan))
app.add_middleware(ASGIHTTPDBSessionMiddleware)
