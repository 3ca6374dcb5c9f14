"""`python -m service`: run the gateway with uvicorn, settings from DBP_GATEWAY_* (HOST, PORT, ...)."""
from __future__ import annotations

import logging
import sys


def main() -> int:
    import uvicorn

    from .app.core.config import load_settings
    from .app.main import create_app

    settings = load_settings()  # SystemExit with a clear message on bad settings
    level = "DEBUG" if settings.LOG_LEVEL == "trace" else settings.LOG_LEVEL.upper()
    logging.basicConfig(level=level, format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(settings)
    # one worker: the in-flight bound and the metrics are per process (scale with more replicas)
    # loop/http "auto" take uvloop and httptools (service/requirements.txt): less event-loop and HTTP parsing
    # time per request than asyncio + h11 (benchmarks/profile_gateway.py)
    uvicorn.run(app, host=settings.HOST, port=settings.PORT, log_level=settings.LOG_LEVEL, access_log=False,
                timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
