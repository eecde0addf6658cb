"""``depends-function``: ``depends.py`` with ``Depends(get_session, scope="function")``.

FastAPI (>= 0.121) then runs the dependency's exit (COMMIT, close) when the endpoint
function returns, before the response is sent.
"""

from .depends import make_app

app = make_app("function")
