"""The OpenAI-compatible HTTP server (`flashmem serve`, or serve() here), in server.py.

It needs the optional extra: pip install "flashmem[server]" (Starlette and uvicorn). They are
imported on first use of serve or create_app, so flashmem imports without them.

    from flashmem.serving import serve
    serve("model.gguf", port=8000, max_batch=8)   # until SIGINT/SIGTERM
"""
from __future__ import annotations

__all__ = ["serve", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from . import server  # ImportError naming `pip install "flashmem[server]"` without the extra

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
