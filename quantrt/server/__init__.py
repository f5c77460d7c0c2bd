"""An OpenAI-compatible HTTP server over the async engine (``quantrt serve``; needs the
``serve`` extra: FastAPI, uvicorn, prometheus-client).

    from quantrt.server.app import build_app        # an ASGI app for any ASGI server
    from quantrt.server.launch import build_engine, serve
"""
