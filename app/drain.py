"""Graceful drain on SIGTERM: readiness flips first, then uvicorn's graceful shutdown.

On the first SIGTERM the server does not stop listening at once (uvicorn's own handler would):

1. **drain delay** (``VISION_DRAIN_DELAY_S``): the app is marked draining, so ``/health/ready``
   (and ``/v2/health/ready``) answer 503 and every new predict request 503 ``DRAINING`` with
   ``Retry-After``, while the socket stays open. Load balancers that poll readiness take the
   replica out of rotation, and those that retry a 503 elsewhere (our nginx) do so, instead of
   meeting refused connections. Requests already accepted, and the images queued in the batchers,
   go on and complete.
2. **graceful shutdown**: uvicorn stops accepting connections, closes idle keep-alive ones and
   waits up to ``VISION_DRAIN_GRACE_S`` for the requests in flight; then the lifespan stops the
   batchers (anything still queued then fails with 503 DRAINING) and the process exits, with the
   status of the signal that stopped it.

So the process is gone at most ``drain_delay_s + drain_grace_s`` (plus the batchers' stop) after
the signal: orchestrators must allow more than that (Kubernetes ``terminationGracePeriodSeconds``,
Compose ``stop_grace_period``). A second SIGTERM during the delay skips the rest of it. SIGINT
(Ctrl+C at a terminal) skips the delay: graceful shutdown at once, a second Ctrl+C forces the exit.
A SIGTERM before any model is warm skips the delay too: no balancer routes to such a replica.
The server also stops when the service's start failed (``InferenceService.failure``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:  # torch: python -m app imports this module before anything heavy
    from fastapi import FastAPI

    from app.inference import InferenceService

log = logging.getLogger(__name__)

#: A SIGHUP that came before the server took over the signals: it reloads once the service runs.
HANGUP_BEFORE_SERVING = threading.Event()


class DrainingServer(uvicorn.Server):
    """A uvicorn server for ``app`` whose first SIGTERM starts a drain delay before the graceful
    shutdown (the app's service is marked draining when it starts), and which stops by itself when
    the service's start fails."""

    def __init__(self, config: uvicorn.Config, *, app: FastAPI, drain_delay_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_delay_s = drain_delay_s
        self._drain_signal: int | None = None
        self._drain_started = 0.0
        self._hangup_pending = False

    @property
    def service(self) -> InferenceService | None:
        """The app's service (set by its lifespan), or None before that."""
        service: InferenceService | None = getattr(self.app.state, "service", None)
        return service

    @property
    def failure(self) -> str | None:
        """Why the service could not start, or None."""
        service = self.service
        return service.failure if service is not None else None

    def on_drain(self) -> None:
        service = self.service
        if service is not None:
            service.draining = True

    def _serving_any(self) -> bool:
        service = self.service
        return (
            service is not None
            and service.registry is not None
            and any(model.ready for model in service.registry.models.values())
        )

    @property
    def draining(self) -> bool:
        return self._drain_signal is not None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn restores the handler it found, then re-raises the signal that stopped it: let that
        # be the default action (death by SIGTERM), not exit_on_sigterm_until_serving's SystemExit
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.on_hangup)
            if HANGUP_BEFORE_SERVING.is_set():
                HANGUP_BEFORE_SERVING.clear()
                self.on_hangup()
        await super().serve(sockets)

    def on_hangup(self) -> None:
        """SIGHUP: reload the models file (``app.reload``) while serving."""
        service = self.service
        if service is None:  # the lifespan has not run yet: on_tick passes it on once it has
            log.info("SIGHUP before the service exists: it reloads once the service starts")
            self._hangup_pending = True
            return
        from app.reload import on_hangup

        service.in_background(on_hangup(service))  # waits for the start, if it is still running

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if (
            sig == signal.SIGTERM
            and not self.draining
            and not self.should_exit
            and self.drain_delay_s > 0
            and self._serving_any()
        ):
            self._drain_signal = sig
            self._drain_started = time.monotonic()
            self.on_drain()
            log.info(
                "SIGTERM: draining (readiness and new requests 503) for %.1f s, then a graceful "
                "shutdown of up to %s s",
                self.drain_delay_s,
                self.config.timeout_graceful_shutdown,
            )
            return
        if not self.draining:
            self.on_drain()  # SIGINT, or no delay: readiness still flips before the shutdown
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._hangup_pending and self.service is not None:
            self._hangup_pending = False
            self.on_hangup()
        if self.failure is not None and not self.should_exit:
            self.should_exit = True  # python -m app reports the failure and exits 1
        if (
            self._drain_signal is not None
            and not self.should_exit
            and time.monotonic() - self._drain_started >= self.drain_delay_s
        ):
            log.info("drain delay over: graceful shutdown")
            super().handle_exit(self._drain_signal, None)  # as uvicorn's own handler: exit status kept
        return await super().on_tick(counter)


def exit_on_sigterm_until_serving() -> None:
    """Make SIGTERM end the process before uvicorn handles it, and SIGHUP (a reload) wait for the
    server (``HANGUP_BEFORE_SERVING``): its default action would end the process, and ignoring it
    would lose a reload that a worker's supervisor passed on while this worker was starting.

    Python leaves SIGTERM at its default, which a process running as PID 1 (a container's entry
    point) does not get: ``docker stop`` would wait its whole grace period and then SIGKILL. Raising
    SystemExit exits with 143 (128 + SIGTERM), as the default action reads to a shell.
    """

    def stop(sig: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + sig)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, lambda sig, frame: HANGUP_BEFORE_SERVING.set())
    # a worker starts with SIGHUP blocked (Supervisor.spawn), and the re-exec keeps one blocked
    # (hold_hangup_over_exec): one sent meanwhile was kept pending, and arrives now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def hold_hangup_over_exec() -> None:
    """Before ``execve``: block SIGHUP, which the new image inherits, so a SIGHUP stays pending
    instead of ending it before :func:`exit_on_sigterm_until_serving` runs there; one this process
    already caught is raised again, to be pending too."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    if HANGUP_BEFORE_SERVING.is_set():
        HANGUP_BEFORE_SERVING.clear()
        signal.pthread_kill(threading.get_ident(), signal.SIGHUP)  # this thread's: kept by execve
