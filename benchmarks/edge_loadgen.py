"""A small HTTP/1.1 load generator for the edge service, run as its own process.

Each of ``--concurrency`` clients keeps one keep-alive connection. Two ways to load:

- closed loop (default): every client sends its next request as soon as the previous answer
  is in; the request rate is the most the server sustains (throughput).
- open loop (``--rate R``): requests are *scheduled* at R per second in total, spread evenly
  over the clients; latency counts from the scheduled time, so time spent waiting behind a
  slow answer is included (no coordinated omission).

GET requests cycle through the paths in ``--paths`` (one per line); POST requests send the
bodies in ``--bodies`` (one JSON document per line) to ``--path``. Latency runs from the
scheduled (open) or actual (closed) send time to the last byte of the body; requests that
start during ``--warmup`` are not counted. Prints one JSON object.

Raw asyncio streams on uvloop rather than an HTTP client library: a client that costs tens
of microseconds per request leaves the CPU to the server being measured.

Example: python benchmarks/edge_loadgen.py --port 8765 --paths paths.txt --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GRACE_S = 2.0  # open loop: how long after the window a late client may keep sending


@dataclass
class Tally:
    """What the clients observed during the measured window."""

    latencies: list[float] = field(default_factory=list)
    last_end: float = 0.0
    unsent: int = 0  # open loop: scheduled requests given up on (the server fell behind)
    statuses: dict[int, int] = field(default_factory=dict)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    await reader.readexactly(length)
    return int(head[9:12])


async def _client(
    host: str,
    port: int,
    requests: list[bytes],
    offset: int,
    window: tuple[float, float],
    interval: float | None,
    first: float,
    tally: Tally,
) -> None:
    warm_until, stop_at = window
    reader, writer = await asyncio.open_connection(host, port)
    clock = time.perf_counter
    i = offset
    due = first
    try:
        while True:
            if interval is None:
                start = clock()
            else:
                start = due
                due += interval
                wait = start - clock()
                if wait > 0:
                    await asyncio.sleep(wait)
            if start >= stop_at:
                break
            if interval is not None and clock() > stop_at + GRACE_S:
                # Overloaded: stop, and count what was still due as not served in time.
                tally.unsent += int((stop_at - start) / interval) + 1
                break
            status = await _exchange(reader, writer, requests[i % len(requests)])
            i += 1
            end = clock()
            if start >= warm_until:
                tally.latencies.append(end - start)
                tally.last_end = max(tally.last_end, end)
                tally.statuses[status] = tally.statuses.get(status, 0) + 1
    finally:
        writer.close()


def build_requests(
    host: str, paths: list[str], path: str, bodies: list[bytes] | None
) -> list[bytes]:
    """The raw HTTP/1.1 requests the clients cycle through."""
    if bodies is None:
        return [f"GET {p} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() for p in paths]
    return [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]


async def run(
    host: str,
    port: int,
    requests: list[bytes],
    concurrency: int,
    duration: float,
    warmup: float,
    rate: float | None = None,
) -> dict[str, object]:
    """Drive the clients for ``warmup + duration`` seconds; summary of the measured part."""
    tally = Tally()
    now = time.perf_counter() + 0.2  # connections are open before the first scheduled send
    window = (now + warmup, now + warmup + duration)
    interval = concurrency / rate if rate else None
    step = max(1, len(requests) // max(1, concurrency))
    await asyncio.gather(
        *(
            _client(
                host,
                port,
                requests,
                c * step,
                window,
                interval,
                now + (interval or 0) * c / concurrency,
                tally,
            )
            for c in range(concurrency)
        )
    )
    lat = np.asarray(tally.latencies) * 1000.0
    if tally.unsent:  # requests never served in time count as infinitely late
        lat = np.concatenate([lat, np.full(tally.unsent, np.inf)])
    # Achieved rate: an overloaded server finishes the scheduled requests late.
    span = max(duration, tally.last_end - window[0])
    pct = {
        f"p{q}_ms": float(np.percentile(lat, q, method="higher")) if len(lat) else None
        for q in (50, 90, 99)
    }
    return {
        "mode": "open" if rate else "closed",
        "offered_rps": rate,
        "concurrency": concurrency,
        "requests": len(tally.latencies),
        "unsent": tally.unsent,
        "seconds": duration,
        "rps": len(tally.latencies) / span,
        **pct,
        "max_ms": float(lat.max()) if len(lat) else None,
        "overloaded": tally.unsent > 0,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--paths", type=Path, help="GET: file with one path a line")
    parser.add_argument("--bodies", type=Path, help="POST: file with one JSON body a line")
    parser.add_argument("--path", default="/v1/events", help="POST: the path to send to")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, help="open loop: total requests per second")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    if (args.paths is None) == (args.bodies is None):
        parser.error("give exactly one of --paths and --bodies")
    paths = args.paths.read_text().split() if args.paths else []
    bodies = args.bodies.read_bytes().splitlines() if args.bodies else None
    requests = build_requests(args.host, paths, args.path, bodies)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    result = asyncio.run(
        run(
            args.host,
            args.port,
            requests,
            args.concurrency,
            args.duration,
            args.warmup,
            args.rate,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
