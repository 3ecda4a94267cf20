"""Import the Kotak SDK (``neo_api_client``) without letting it take over logging.

On import the SDK replaces the process-wide structlog configuration, adds its own stdout
handler, and opens ``./logs/neo-api-client.log``. Every NeoPulse module that needs the SDK
imports it through ``import_sdk()``, which switches the SDK's file log off, restores our
structlog setup and routes the SDK's records through our (redacting) handlers.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType


@functools.cache
def import_sdk() -> ModuleType:
    os.environ.setdefault("NEO_LOG_FILE_ENABLED", "false")
    os.environ.setdefault("NEO_LOG_LEVEL", "WARNING")
    import neo_api_client

    from libs.common.log import reapply_logging

    sdk_logger = logging.getLogger("neo_api_client")
    for handler in list(sdk_logger.handlers):
        sdk_logger.removeHandler(handler)
    sdk_logger.propagate = True
    sdk_logger.setLevel(logging.WARNING)
    reapply_logging()
    return neo_api_client
