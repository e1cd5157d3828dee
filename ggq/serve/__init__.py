"""``ggq serve``: an OpenAI-compatible HTTP server over ggq's runtime.

:mod:`ggq.serve.engine` runs generation (a request queue, slots, one worker thread);
:mod:`ggq.serve.app` is the ASGI app (FastAPI) with the request models and the endpoints;
:func:`ggq.serve.app.serve` loads a model and runs the app under uvicorn.
"""
