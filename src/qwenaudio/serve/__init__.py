"""Serving: one model answering many clients.

`Engine` (engine.py) runs the model with continuous batching: prompts from any thread join one batch at step
boundaries and leave it as they finish. `create_app` (app.py) puts an OpenAI-compatible HTTP API in front of an
engine; it needs the optional `serve` extra (`pip install 'qwenaudio[serve]'`), so it is imported only when asked
for, and `import qwenaudio.serve` works without it.
"""

from .engine import Engine, EngineClosed, EngineStats, Reply

__all__ = ["Engine", "EngineClosed", "EngineStats", "Reply", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # the HTTP stack only on demand
        from .app import create_app
        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
