"""How many threads torch's CPU kernels use: the idle CPUs, so that a shared machine degrades gracefully.

torch runs each CPU kernel on a team of OpenMP threads that meet at a barrier when it ends. If
another process keeps one of those CPUs busy, the thread scheduled there waits for its turn (a
scheduler time slice, milliseconds) and every other thread waits for it at the barrier: on this
project's 2-CPU machine, with other processes running, a (2, 576) x (576, 1536) product took
0.25 ms at the median but 40 ms at the 90th percentile with 2 threads, and 0.17 / 0.24 ms with
1 thread. A decode step runs hundreds of such kernels, so one busy neighbour can make it 100x
slower with as many threads as CPUs, and barely slower with one thread fewer.

So nanoengine gives torch as many threads as there are CPUs that this process may use and that
other processes are not already keeping busy (the 1-minute load average at the time of the first
model load), at least one. `$NANOENGINE_THREADS` overrides this: a number, or `keep` to leave
torch's own setting (`torch.set_num_threads`, `OMP_NUM_THREADS`) alone. It is chosen once, before
any decode step is compiled, because compiled kernels keep the thread count they were built with.
"""

from __future__ import annotations

import logging
import os

import torch

from .errors import InvalidParameterError

logger = logging.getLogger(__name__)

THREADS_ENV = "NANOENGINE_THREADS"
_chosen = False


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; a container's CPU quota is not seen)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def busy_cpus() -> float:
    """CPUs kept busy by runnable processes, on average over the last minute (0 where unknown)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_threads() -> int:
    """The idle CPUs, at least one: see the module docstring."""
    return max(1, min(usable_cpus(), round(usable_cpus() - busy_cpus())))


def threads_setting() -> int | None:
    """What `$NANOENGINE_THREADS` asks for: a count, or None for `keep`; unset or `auto`: the default."""
    value = os.environ.get(THREADS_ENV, "auto").strip().lower()
    if value == "keep":
        return None
    if value == "auto":
        return default_threads()
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise InvalidParameterError(f"${THREADS_ENV} must be a positive number, auto or keep; not {value!r}")


def choose_threads() -> None:
    """Set torch's intra-op threads once per process (before the first model loads)."""
    global _chosen
    if _chosen:
        return
    threads = threads_setting()
    _chosen = True
    if threads is not None and threads != torch.get_num_threads():
        logger.info("using %d CPU threads of %d (set $%s to change)", threads, usable_cpus(), THREADS_ENV)
        torch.set_num_threads(threads)
