"""OpenAI-compatible serving: `engine.py` batches requests on one model thread, `app.py` is the HTTP layer.

    engine = Engine(model, tokenizer, max_batch=8, max_context=2048)
    app = create_app(engine, "my-model")         # from phikit.serve.app (needs the [serve] extra)
    uvicorn.run(app, host="127.0.0.1", port=8000)

This package imports only torch; FastAPI and uvicorn are imported by `app.py` and `phikit serve`.
"""

from .engine import Engine, EngineClosed, Event, Request

__all__ = ["Engine", "EngineClosed", "Event", "Request"]
