"""``python -m app [--host 127.0.0.1] [--port 8000]``: check settings, load the models, serve.

The models are loaded BEFORE uvicorn starts, so a bad models file or checkpoint stops the start
with one message naming the file and the problem (exit 1; bad settings exit 2), never a traceback.
Before anything else it re-executes itself with glibc's malloc tuned (``app/allocator.py``).
The warm-up runs once the socket is up (``/health/live`` answers during it); a warm-up failure
stops the server with exit 1. SIGTERM drains (``app/drain.py``): readiness and new work 503 for
``VISION_DRAIN_DELAY_S``, then uvicorn's graceful shutdown of up to ``VISION_DRAIN_GRACE_S``; a
SIGTERM while the models still load exits at once (143). With ``VISION_WORKERS`` > 1 this process
reserves the port and supervises that many copies of itself, each listening on it with
SO_REUSEPORT (``app/workers.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from app.allocator import reexec_with_tuning
from app.drain import exit_on_sigterm_until_serving
from app.logs import configure_logging
from app.settings import Settings

log = logging.getLogger("app")

#: The public checkpoints' models file; ``weights/download.py`` fetches its checkpoints.
PUBLIC_MODELS_FILE = Path("weights/public.toml")
#: The default models file: the small demo checkpoints committed under ``weights/demo/``.
DEFAULT_MODELS_FILE = Path("weights/models.toml")


def fail(message: str, code: int = 1) -> int:
    print(f"vision-serve: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a real start (not a test calling main): tune glibc malloc first
        reexec_with_tuning(sys.argv[1:])
        exit_on_sigterm_until_serving()
    parser = argparse.ArgumentParser(prog="python -m app", description="Serve VGG16 / SSD models over HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker
    parser.add_argument("--warm-first", action="store_true", help=argparse.SUPPRESS)  # a restarted worker
    args = parser.parse_args(argv)

    try:
        settings = Settings()
    except ValidationError as exc:
        return fail(f"invalid settings: {_describe(exc)}", 2)
    try:
        device, precision = settings.torch_device, settings.torch_precision
    except ValueError as exc:
        return fail(f"invalid settings: {exc}", 2)
    configure_logging(settings.log_level, settings.log_json)

    # heavy imports after the settings check, so a typo answers at once
    import torch
    import uvicorn

    from app.main import create_app
    from app.metrics import Metrics
    from app.models_file import ModelsFileError, read_models_file
    from app.service import load_predictors
    from models import CheckpointError, ModelConfigError

    torch.set_num_threads(settings.resolved_torch_threads)
    started = time.perf_counter()
    try:
        models_file = read_models_file(settings.models_file)
    except ModelsFileError as exc:
        return fail(f"{exc}{_how_to_get_weights(settings.models_file)}")
    missing = [spec for spec in models_file.specs if not spec.weights.is_file()]
    if missing:
        names = ", ".join(f"{spec.name} ({spec.weights})" for spec in missing)
        hint = _how_to_get_weights(settings.models_file)
        return fail(f"{settings.models_file}: checkpoint file(s) not found: {names}{hint}")
    if settings.workers > 1 and not args.reuse_port:  # the supervisor: it binds, the workers load
        from app.workers import serve_workers

        return serve_workers(args.host, args.port, settings.workers)
    metrics = Metrics()
    log.info(
        "loading %d model(s) from %s on %s (%s)",
        len(models_file.specs),
        settings.models_file,
        device,
        precision,
    )
    try:
        predictors = load_predictors(models_file, settings, metrics)
    except (CheckpointError, ModelConfigError) as exc:
        return fail(f"{settings.models_file}: {exc}")
    log.info(
        "models loaded in %.1f s; starting the server on %s:%d",
        time.perf_counter() - started,
        args.host,
        args.port,
    )

    from app.drain import DrainingServer

    fatal: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        if server is not None:
            server.should_exit = True

    if args.warm_first:  # a restarted worker: warm up before it listens
        from app.service import warm_predictor

        started = time.perf_counter()
        try:
            for predictor in predictors:
                warm_predictor(predictor, settings)
        except Exception as exc:
            return fail(f"warm-up failed: {exc}")
        log.info("models warmed up before serving in %.1f s", time.perf_counter() - started)
    app = create_app(
        settings,
        predictors,
        defaults=models_file.defaults,
        metrics=metrics,
        on_fatal=on_fatal,
        warmed=args.warm_first,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=settings.drain_grace_s,  # type: ignore[arg-type]  # a float works
    )

    def on_drain() -> None:
        service = getattr(app.state, "service", None)  # set by the lifespan
        if service is not None:
            service.draining = True

    server = DrainingServer(config, drain_delay_s=settings.drain_delay_s, on_drain=on_drain)
    if args.reuse_port:  # a worker of app/workers.py: its own socket on the shared port
        from app.workers import bind_socket

        try:
            sock = bind_socket(args.host, args.port)
        except OSError as exc:
            return fail(f"cannot listen on {args.host}:{args.port}: {exc}")
        server.run(sockets=[sock])
    else:
        server.run()
    if fatal:
        return fail(f"warm-up failed: {fatal[0]}")
    return 0


def _describe(exc: ValidationError) -> str:
    """Settings errors as ``VISION_NAME: problem (got 'value')``, joined by "; "."""
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["loc"]:
            name = "VISION_" + "_".join(str(p) for p in error["loc"]).upper()
            parts.append(f"{name}: {message} (got {error.get('input')!r})")
        else:
            parts.append(message)
    return "; ".join(parts)


def _how_to_get_weights(models_file: Path) -> str:
    """What to do when a shipped models file's checkpoints are not there (empty for other files)."""
    resolved = models_file.resolve()
    if resolved == DEFAULT_MODELS_FILE.resolve():
        return (
            f"\n{models_file} serves the demo checkpoints committed under weights/demo/; they are part"
            "\nof the repository, so this checkout is incomplete (git checkout -- weights/demo restores"
            "\nthem), or point VISION_MODELS_FILE at your own models file (see weights/README.md)."
        )
    if resolved == PUBLIC_MODELS_FILE.resolve():
        return (
            f"\n{models_file} lists public checkpoints that are not in the repository."
            "\nEither run (from the repository root)"
            "\n    python weights/download.py"
            "\nwhich needs the network and checks each file's SHA-256, or point VISION_MODELS_FILE"
            "\nat your own models file (see weights/README.md)."
        )
    return ""

if __name__ == "__main__":
    sys.exit(main())
