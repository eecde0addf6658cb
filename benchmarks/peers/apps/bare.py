"""``bare``: FastAPI and nothing else (``/nodb`` only): the floor for the no-database rows."""

from ._common import new_app

app = new_app()
