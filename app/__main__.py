"""``python -m app [--host 127.0.0.1] [--port 8000]``: serve, or supervise ``VISION_WORKERS`` workers.

Settings come first: a bad one (or an unknown ``VISION_*`` variable) exits 2 with one line. With
``VISION_WORKERS`` > 1 this process supervises that many workers (``app/workers.py``), each of
which is this same command. Otherwise it serves: glibc malloc tuned by re-executing itself
(``app/allocator.py``), then uvicorn runs the app, whose lifespan loads and warms up the models. A
start that fails (models file, checkpoint, warm-up) exits 1 with its message. SIGTERM drains
(``app/drain.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from app.drain import exit_on_sigterm_until_serving, hold_hangup_over_exec
from app.logs import configure_logging
from app.settings import Settings, unknown_variables

log = logging.getLogger("app")


def fail(message: str, code: int = 1) -> int:
    print(f"vision-serve: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="Serve VGG16 / SSD models over HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    args = parser.parse_args(argv)
    if argv is None:  # a real start: first thing, as a worker's supervisor may signal it early
        exit_on_sigterm_until_serving()
    try:
        settings = Settings()
        _ = (settings.torch_device, settings.torch_precision, settings.runtime_choice)  # a bad one exits 2
    except ValidationError as exc:
        return fail(f"invalid settings: {describe(exc)}", 2)
    except ValueError as exc:
        return fail(f"invalid settings: {exc}", 2)
    if settings.workers > 1 and settings.worker_slot is None:
        from app.workers import serve_workers

        configure_logging(settings.log_level, settings.log_json)
        return serve_workers(args.host, args.port, settings.workers)
    if argv is None and settings.allocator_tuning:  # a real start, not a test calling main
        from app.allocator import reexec_with_tuning

        hold_hangup_over_exec()  # serve() lets it through when no re-exec was needed
        reexec_with_tuning(sys.argv[1:])
    return serve(settings, args.host, args.port)


def serve(settings: Settings, host: str, port: int) -> int:
    """Run the service on ``host:port`` until it is stopped; the exit status."""
    exit_on_sigterm_until_serving()
    configure_logging(settings.log_level, settings.log_json)
    import torch
    import uvicorn

    from app.drain import DrainingServer
    from app.main import create_app
    from app.workers import bind_socket

    torch.set_num_threads(settings.resolved_torch_threads)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # uvicorn annotates int; a float works
        timeout_graceful_shutdown=settings.drain_grace_s,  # type: ignore[arg-type]  # as above
    )
    server = DrainingServer(config, app=app, drain_delay_s=settings.drain_delay_s)
    if settings.worker_slot is not None:  # a worker of app/workers.py: its own socket on the shared port
        try:
            sock = bind_socket(host, port)
        except OSError as exc:
            return fail(f"cannot listen on {host}:{port}: {exc}")
        server.run(sockets=[sock])
    else:
        server.run()
    if server.failure is not None:
        return fail(server.failure)
    return 0


def describe(exc: ValidationError) -> str:
    """Settings errors as ``VISION_NAME: problem (got 'value')``, joined by "; "."""
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":  # a .env key that is no setting
            parts += [f".env: {message}" for message in unknown_variables({str(error["loc"][0]).upper(): ""})]
        elif error["loc"]:
            name = "VISION_" + "_".join(str(p) for p in error["loc"]).upper()
            parts.append(f"{name}: {message} (got {error.get('input')!r})")
        else:
            parts.append(message)
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
