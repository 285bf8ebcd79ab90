"""Does `nanoengine serve` still answer while hundreds of clients hold connections half-sent?

Starts `nanoengine serve` on a loopback port (optionally with a low open-files limit, as on many
machines), opens STALLED connections that each send half a request and wait, then times a
normal completion request, and reports how much the server logged meanwhile.

    python benchmarks/stalled_connections.py --stalled 520 --open-files 1024
"""

from __future__ import annotations

import argparse
import queue
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import requests

HALF_REQUEST = (
    b"POST /v1/llm/completions-sync?model_endpoint_name=smollm2-135m-instruct HTTP/1.1\r\n"
    b"Host: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prom"
)


def start_server(open_files: int | None, extra: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    def limit() -> None:
        if open_files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))  # hard too: no raising it

    command = [sys.executable, "-m", "nanoengine", "serve", "--port", "0", *extra]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=0.5))
        except queue.Empty:
            continue
        if found := re.search(r"running on (http://127\.0\.0\.1:\d+)", seen[-1]):
            threading.Thread(target=lambda: [seen.append(line) for line in iter(lines.get, None)], daemon=True).start()
            return process, found.group(1), seen
    process.kill()
    raise SystemExit("the server did not start:\n" + "".join(seen))


def stall(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(HALF_REQUEST)
        sockets.append(s)
    return sockets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stalled", type=int, default=520, help="connections that send half a request")
    parser.add_argument("--open-files", type=int, default=1024, help="the server's open-files limit (0: unchanged)")
    parser.add_argument("--timeout", type=float, default=60, help="how long the normal request may take")
    parser.add_argument("serve_args", nargs="*", help="more `nanoengine serve` options (after --)")
    args = parser.parse_args()
    process, url, log = start_server(args.open_files, args.serve_args)
    try:
        start_lines = len(log)
        port = int(url.rsplit(":", 1)[1])
        sockets = stall(port, args.stalled)
        time.sleep(1)  # let the server take them all in
        start = time.perf_counter()
        try:
            response = requests.post(
                f"{url}/v1/llm/completions-sync?model_endpoint_name=smollm2-135m-instruct",
                json={"prompt": "The capital of France is", "max_new_tokens": 3, "temperature": 0},
                timeout=args.timeout,
            )
            outcome = f"HTTP {response.status_code} {response.json()['output']['text']!r}"
        except requests.RequestException as err:
            outcome = f"no answer: {type(err).__name__}"
        elapsed = time.perf_counter() - start
        time.sleep(1)
        still_open = sum(1 for s in sockets if not closed_by_server(s))
        logged = log[start_lines:]
        print(f"{args.stalled} stalled connections (server open-files limit {args.open_files or 'unchanged'}); "
              f"{still_open} still open when the normal request was answered")
        print(f"normal request: {outcome} after {elapsed:.2f} s")
        print(f"server log meanwhile: {len(logged)} lines, {sum(map(len, logged))} bytes, "
              f"{sum('Traceback' in line for line in logged)} tracebacks")
        for line in logged[:10]:
            print("  | " + line.rstrip())
        for s in sockets:
            s.close()
    finally:
        process.terminate()
        process.wait(30)


def closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        s.recv(4096)  # an answer (408/503) or the end of the stream: the server closed it
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


if __name__ == "__main__":
    main()
