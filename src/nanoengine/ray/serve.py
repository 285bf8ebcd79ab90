"""Ray Serve: `nanoengine serve`'s app in replicas, behind Serve's HTTP proxy.

    from ray import serve
    from nanoengine.ray import server_app
    serve.run(server_app(ServerSettings(models={"smollm2": "smollm2-135m-instruct"}), num_replicas=4))

Each replica is a Serve deployment's actor that loads the served models once and answers with
the same FastAPI app as `nanoengine serve` (`server.app.create_app`): LLM Engine's routes and the
OpenAI ones, so the unmodified `llmengine` and `openai` clients work against Serve's address.
Serve spreads requests over the replicas and replaces one that dies.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import replace
from typing import Any

import ray

from ..server.app import DEFAULT_HOST
from ..server.common import ServerSettings

logger = logging.getLogger(__name__)

DEFAULT_SERVE_PORT = 8000  # Ray Serve's own default


class NanoEngineServer:
    """A replica: loads the models of `settings` with the model and engine `options` (`configure()`'s
    parameters; a replica is a process of its own, so they are passed, not inherited), then serves
    `create_app(settings)`."""

    def __init__(
        self, settings: ServerSettings, options: dict[str, Any] | None = None, threads: int | None = None
    ) -> None:
        from ..api.models import configure
        from ..server.app import preload

        os.environ["NANOENGINE_THREADS"] = str(threads or os.environ.get("OMP_NUM_THREADS") or "auto")
        configure(**(options or {}))
        preload(settings)
        self.settings = settings

    def __serve_build_asgi_app__(self) -> Any:
        from ..server.app import create_app

        return create_app(self.settings)


def server_app(
    settings: ServerSettings | None = None,
    *,
    num_replicas: int = 2,
    num_cpus: float = 1,
    options: dict[str, Any] | None = None,
    name: str = "nanoengine",
) -> Any:
    """The Serve application (`Deployment.bind()`) of `num_replicas` replicas, each reserving
    `num_cpus` of Ray's CPUs (and using as many torch threads, at least one)."""
    from ray import serve

    replica = serve.ingress()(NanoEngineServer)  # the app is built in each replica, not pickled
    deployment = serve.deployment(replica, name=name, num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus})
    return deployment.bind(settings or ServerSettings(), options or {}, max(1, int(num_cpus)))


def serve_on_ray(
    settings: ServerSettings,
    *,
    address: str = "local",
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_SERVE_PORT,
    num_replicas: int = 2,
    threads: int = 1,
    options: dict[str, Any] | None = None,
) -> None:
    """`nanoengine serve --ray`: start Serve's proxy on host:port and the replicas, and serve until
    Ctrl-C (then Serve, and a Ray instance started here, are shut down)."""
    from ray import serve

    from ..server.guard import is_loopback_address
    from .data import connect

    if not is_loopback_address(host) and settings.allowed_hosts == ():
        settings = replace(settings, allowed_hosts=None)  # reachable by other names by intent, as `serve` does
    started = connect(address, num_replicas * threads)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(server_app(settings, num_replicas=num_replicas, num_cpus=threads, options=options), name="nanoengine")
        logger.info("serving on http://%s:%d/ with %d replicas (Ctrl-C to stop)", host, port, num_replicas)
        signal.signal(signal.SIGTERM, interrupt)  # a SIGTERM stops it as Ctrl-C does, shutting Serve down
        threading.Event().wait()  # until Ctrl-C
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
