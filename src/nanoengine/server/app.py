"""`nanoengine serve`: one ASGI app with LLM Engine's routes (`llmengine_routes`) and the OpenAI
routes (`openai_routes`) over the local `Completion` facade, behind the guard (`guard`) that
keeps slow, hostile and departed clients from taking the server down, run by uvicorn.

FastAPI and uvicorn come with the optional `server` extra and are imported only once a server is built.
"""

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .common import ApiError, InFlight, ServerSettings, ServerSetupError, version

if TYPE_CHECKING:  # imported at run time only once a server is built
    import uvicorn
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5005
MAX_HEADER_BYTES = 16 << 10  # uvicorn's (h11's) default, said here


def create_app(settings: ServerSettings) -> "FastAPI":
    """The ASGI app: LLM Engine's routes, the OpenAI routes, `/healthz`, behind the request guard."""
    try:
        from fastapi import Depends, FastAPI, Request, Response
        from fastapi.responses import JSONResponse

        from .guard import RequestGuard
        from .llmengine_routes import check_key, llmengine_router
        from .openai_routes import openai_router
    except ImportError as err:
        raise ServerSetupError("the server needs its extra: pip install 'nanoengine[server]'") from err
    app = FastAPI(title="nanoengine", version=version(), docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, allowed_hosts=settings.allowed_hosts)
    in_flight = InFlight()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> Response:
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    @app.get("/healthz")
    @app.get("/healthcheck")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active_requests": in_flight.requests}

    async def authorized(request: Request) -> None:
        check_key(request, settings.api_key)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorized)])
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    app.include_router(llmengine_router(settings, in_flight))
    app.include_router(openai_router(settings, in_flight))
    return app



def preload(settings: ServerSettings) -> None:
    """Load (and, for a registered model, fetch) every served model before taking requests."""
    from ..api.models import get_model

    for name, target in settings.models.items():
        logger.info("loading %s (%s)", name, target)
        get_model(target)



def serve(settings: ServerSettings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Run the server until Ctrl-C / SIGTERM; in-flight requests get 5 s to finish, then are cancelled."""
    server = uvicorn_server(settings, host, port)
    from .guard import is_loopback_address

    if settings.api_key is None and not is_loopback_address(host):
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    server.run()



def uvicorn_server(settings: ServerSettings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> "uvicorn.Server":
    """The uvicorn server for `settings`, with the limits of `server_guard` (see there why)."""
    try:
        import uvicorn

        from .guard import connection_limits, guarded_protocol
        from .guard import is_loopback_address, throttle_noisy_logs
    except ImportError as err:
        raise ServerSetupError("the server needs its extra: pip install 'nanoengine[server]'") from err
    loopback = is_loopback_address(host)
    if not loopback and settings.allowed_hosts == ():
        settings = replace(settings, allowed_hosts=None)  # reachable by other names by intent
    limits = connection_limits(settings.receive_timeout, settings.max_connections)
    logger.info(
        "at most %d connections, accepted %d at a time; a request must arrive within %g s",
        limits.max_connections, limits.backlog, limits.receive_timeout,
    )  # fmt: skip
    throttle_noisy_logs()
    config = uvicorn.Config(
        create_app(settings), host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5,
        http=guarded_protocol(limits), h11_max_incomplete_event_size=MAX_HEADER_BYTES, backlog=limits.backlog,
        loop="asyncio",  # the loop the guard's limits were measured on, whether or not uvloop is installed
    )  # fmt: skip
    return uvicorn.Server(config)
