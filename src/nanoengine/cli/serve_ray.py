"""`nanoengine serve --ray`: the same server in Ray Serve replicas (`nanoengine.ray.serve`, the ray extra)."""

from __future__ import annotations

import argparse

from . import options as check

LOCAL = "local"  # `--ray` without an address: a Ray instance on this machine, for this command only


def add_serve_on_ray(serve: argparse.ArgumentParser) -> None:
    option = serve.add_argument
    option(
        "--ray", nargs="?", const=LOCAL, metavar="ADDRESS",
        help="serve from Ray Serve replicas behind Serve's proxy on --host/--port (needs the ray extra): on a "
        "cluster's ADDRESS (auto: the one `ray start` made here), or without one on a Ray instance started here",
    )  # fmt: skip
    option("--replicas", type=check.positive_int, default=2, metavar="N", help="replicas with --ray (default: 2)")
    option("--ray-threads", type=check.positive_int, default=1, metavar="N",
           help="CPUs (torch threads) per replica with --ray (default: 1)")  # fmt: skip


def run_serve_on_ray(args: argparse.Namespace, settings) -> int:
    from ..ray.serve import serve_on_ray  # says which extra to install when ray is missing

    options = dict(
        dtype=args.dtype, device=args.device, compile=args.compile or None, max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk, background_compile=args.background_compile,
    )  # fmt: skip
    serve_on_ray(
        settings, address=args.ray, host=args.host, port=args.port, num_replicas=args.replicas,
        threads=args.ray_threads, options={k: v for k, v in options.items() if v is not None},
    )  # fmt: skip
    return 0
