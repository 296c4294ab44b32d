"""Workers stop with their server, however the server is stopped.

BentoML's supervisor (circus) starts every worker in a session of its own (``setsid``), so a
kill of the server's process group (``kill -9 -PGID``, a test harness, a process manager) ends
only the server: its workers would go on serving the port, and a restart would fail with
"address already in use". On Linux a worker asks the kernel to send it SIGTERM when its parent
(the server) dies; BentoML's shutdown hooks then run as on any stop.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def stop_with_server() -> None:
    """In a BentoML worker on Linux: be sent SIGTERM when the server process dies. Elsewhere: nothing."""
    from bentoml._internal.context import server_context

    if server_context.worker_index is None or not sys.platform.startswith("linux"):
        return  # the server process itself, or a platform without prctl
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM)) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this worker may outlive a killed server", ctypes.get_errno())
    except (OSError, AttributeError):
        log.warning("prctl is unavailable: this worker may outlive a killed server")
