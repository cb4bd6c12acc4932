#!/usr/bin/env python3
"""A downstream service with a fixed capacity, for bench/diurnal.sh's downstream run.

Serves HTTP/1.1 on 127.0.0.1 (port 0 by default) and prints `port N` on stdout once it listens.
Any request other than the two below takes --latency-ms and answers 200, while fewer than
--capacity requests are in flight; a request beyond that answers 503 at once (no Retry-After):
what an overloaded service behind a load shedder does.

  POST /control?capacity=N   set the capacity (the driver halves and restores it)
  GET  /stats                cumulative counters as JSON: ok, rejected, in_flight, capacity, ...

Every second it appends one JSON line to --log (default: stderr): the requests answered 200 and
503 in that second, the most in flight at once, and the capacity. --schedule changes the capacity
on its own timer instead of the control endpoint, e.g. `60:6,120:12` (seconds after start).

Standard library only; one asyncio process.
"""

import argparse
import asyncio
import json
import sys
import time
import urllib.parse


class Downstream:
    def __init__(self, capacity, latency_ms):
        self.capacity = capacity
        self.latency_s = latency_ms / 1000
        self.in_flight = 0
        self.ok = 0
        self.rejected = 0
        self.connections = 0
        # Per-second counters, reset by the logger.
        self.sec_ok = 0
        self.sec_rejected = 0
        self.sec_in_flight_max = 0

    def stats(self):
        return {
            "t_ms": int(time.time() * 1000),
            "ok": self.ok,
            "rejected": self.rejected,
            "in_flight": self.in_flight,
            "capacity": self.capacity,
            "latency_ms": self.latency_s * 1000,
            "connections": self.connections,
        }

    async def serve_request(self, method, target):
        """(status, body) for one request."""
        url = urllib.parse.urlsplit(target)
        if url.path == "/control" and method == "POST":
            query = urllib.parse.parse_qs(url.query)
            try:
                capacity = int(query["capacity"][0])
                if capacity < 0:
                    raise ValueError
            except (KeyError, ValueError):
                return 400, b"capacity=N (N >= 0) is needed\n"
            self.capacity = capacity
            return 200, json.dumps(self.stats()).encode()
        if url.path == "/stats":
            return 200, json.dumps(self.stats()).encode()
        if self.in_flight >= self.capacity:
            self.rejected += 1
            self.sec_rejected += 1
            return 503, b"over capacity\n"
        self.in_flight += 1
        self.sec_in_flight_max = max(self.sec_in_flight_max, self.in_flight)
        try:
            await asyncio.sleep(self.latency_s)
        finally:
            self.in_flight -= 1
        self.ok += 1
        self.sec_ok += 1
        return 200, b"ok\n"

    async def handle(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    await read_chunked(reader)
                else:
                    length = int(headers.get("content-length", "0"))
                    if length:
                        await reader.readexactly(length)
                status, body = await self.serve_request(method, target)
                close = headers.get("connection", "").lower() == "close"
                reason = {200: "OK", 400: "Bad Request", 503: "Service Unavailable"}[status]
                head = [f"HTTP/1.1 {status} {reason}", f"content-length: {len(body)}", "content-type: text/plain"]
                if close:
                    head.append("connection: close")
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            self.connections -= 1
            writer.close()

    async def log_every_second(self, out, started):
        next_at = time.monotonic() + 1
        while True:
            await asyncio.sleep(max(0, next_at - time.monotonic()))
            next_at += 1
            line = {
                "t": round(time.monotonic() - started),
                "t_ms": int(time.time() * 1000),
                "ok": self.sec_ok,
                "rejected": self.sec_rejected,
                "in_flight_max": self.sec_in_flight_max,
                "capacity": self.capacity,
            }
            self.sec_ok = self.sec_rejected = 0
            self.sec_in_flight_max = self.in_flight
            out.write(json.dumps(line) + "\n")
            out.flush()

    async def follow_schedule(self, schedule, started):
        for at_s, capacity in schedule:
            await asyncio.sleep(max(0, started + at_s - time.monotonic()))
            self.capacity = capacity


async def read_chunked(reader):
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


def parse_schedule(s):
    steps = []
    for part in filter(None, s.split(",")):
        at, capacity = part.split(":")
        steps.append((float(at), int(capacity)))
    return sorted(steps)


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--capacity", type=int, default=40, help="requests in flight at once (default 40)")
    p.add_argument("--latency-ms", type=float, default=500, help="time each request takes (default 500)")
    p.add_argument("--log", help="file for the per-second JSON lines (default: stderr)")
    p.add_argument("--schedule", default="", help="capacity changes AT_S:CAPACITY,... on its own timer")
    args = p.parse_args()
    stub = Downstream(args.capacity, args.latency_ms)
    server = await asyncio.start_server(stub.handle, "127.0.0.1", args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"port {port}", flush=True)
    out = open(args.log, "a", buffering=1) if args.log else sys.stderr
    started = time.monotonic()
    tasks = [asyncio.create_task(stub.log_every_second(out, started))]
    if args.schedule:
        tasks.append(asyncio.create_task(stub.follow_schedule(parse_schedule(args.schedule), started)))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
