"""`simsearch serve`: the API and page of `simsearch.server` on serve.host:serve.port, run by uvicorn."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from simsearch.errors import SimsearchError
from simsearch.server.app import create_app, server_config
from simsearch.server.hardening import check_allowed_hosts, check_host

log = logging.getLogger("simsearch.serve")


def serve(cfg: DictConfig) -> None:
    """`simsearch serve`: the app on cfg.serve.host:port (127.0.0.1 unless told otherwise)."""
    import uvicorn

    check_host(cfg.serve.host, cfg.serve.port)
    check_allowed_hosts(list(cfg.serve.allowed_hosts))
    app = create_app(cfg)
    if cfg.serve.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines; simsearch has no authentication", cfg.serve.host)
    print(f"simsearch: serving {cfg.run.dir} on http://{cfg.serve.host}:{cfg.serve.port}/ (API docs: /docs)")
    server = uvicorn.Server(server_config(app, cfg))
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        pass
    if not server.started:  # uvicorn logged why (the port taken, an address not of this machine)
        raise SimsearchError(f"cannot serve on {cfg.serve.host}:{cfg.serve.port} (see the error above): "
                             "choose another serve.port or serve.host")
