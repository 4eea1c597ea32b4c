"""The JSON API and web page over a store: `app` (the routes), `hardening` (the middleware and start-up
checks in front of them), `thumbnails` and `batching` (uploads embedded together). `simsearch serve`
(`stages/serve.py`) runs it with uvicorn; tests run `create_app` in-process."""
