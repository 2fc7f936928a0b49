"""Hand-written pure-ASGI middlewares, outermost first in `app.build_middleware_chain`."""
