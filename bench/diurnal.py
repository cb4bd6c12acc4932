#!/usr/bin/env python3
"""Load driver, measurements and report of bench/diurnal.sh (XFaaS-style scheduling).

    diurnal.py diurnal    --url U --db DB --node-pid P [options]    (key: $SLUICE_TOKEN or --token)
    diurnal.py downstream --url U --db DB --node-pid P --stub-url S [options]
    diurnal.py replot OUT/diurnal.json        (table and PNG again from a run's JSON)

`diurnal` replays a day compressed into --minutes: async calls of the test guest's
`burn?ms=N` arrive at rate(t) = mean * (1 + a*sin(2*pi*t/T)), a = (R-1)/(R+1) for a
peak-to-trough ratio R (4.3), starting at the mean on the rising side, so the backlog of the
peak has the trough to drain in. Two tenants: `web` (no deadline, mixed criticality, --web-share
of the calls) and `batch` (a deadline --window-min..--window-max of the period after arrival,
mixed criticality). The mean is sized from the node: a short calibration measures the guest CPU
of one call (`cpu_us`), and mean = --load * target * cores / that, the rate a scheduler that
caps guests at the utilization target can run.

`downstream` sends steady async calls of `report?url=STUB` at --load of the stub's capacity
(each POSTs to the stub of bench/downstream_stub.py and fails, so is retried, unless it answers
2xx); the driver halves the stub's capacity at 1/3 of the run and restores it at 2/3, so the
calls overload it in the middle third. It reports when the 503 rate, over a trailing 10 s, fell
under 1% for good after the halving, and when the backlog (waiting + awaiting a retry) was back
to its level before it.

Both record, once a second: the node's process CPU (/proc/PID/stat), the invocations waiting
and running (read from the node's SQLite file), the tenants' /v1/tenants/{t}/usage and, for the
downstream run, the stub's counters and the function's /downstreams. After the run (and a
bounded drain) they read every invocation of the run from the database, print a Markdown table
and write OUT/NAME.png (matplotlib), OUT/NAME.md and OUT/NAME.json.

One asyncio process with keep-alive HTTP/1.1 connections (standard library only; matplotlib
only for the plot). Its own CPU time is reported beside the table.
"""

import argparse
import asyncio
import json
import math
import os
import random
import sqlite3
import sys
import time
import urllib.parse
from datetime import datetime, timezone

# ---------------------------------------------------------------------------------------------
# HTTP/1.1 client: keep-alive connections over asyncio streams.


class Conn:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None
        self.used = False  # whether a request went over the current connection

    async def request(self, method, target, headers, body=b""):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.used = False
        self.used = True
        head = [f"{method} {target} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        resp_headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                resp_headers[k.strip().lower()] = v.strip()
        if resp_headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            data = b"".join(c[:-2] for c in chunks)
        elif "content-length" in resp_headers:
            data = await self.reader.readexactly(int(resp_headers["content-length"]))
        elif status in (204, 304):
            data = b""
        else:
            data = await self.reader.read()
            self.close()
        if resp_headers.get("connection", "").lower() == "close":
            self.close()
        return status, resp_headers, data

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Pool:
    """At most `size` keep-alive connections to one server; a request waits for a free one."""

    def __init__(self, url, size, timeout_s=30):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.timeout_s = timeout_s
        self.idle = asyncio.Queue()
        for _ in range(size):
            self.idle.put_nowait(Conn(self.host, self.port))

    async def request(self, method, target, headers=None, body=b""):
        conn = await self.idle.get()
        try:
            reused = conn.writer is not None and conn.used
            try:
                return await asyncio.wait_for(conn.request(method, target, headers or {}, body), self.timeout_s)
            except (ConnectionError, asyncio.IncompleteReadError) as first:
                # A kept-alive connection the server had closed before it read this request: one
                # retry on a new connection. Not after a partial answer, nor on a fresh one.
                conn.close()
                if not reused or (isinstance(first, asyncio.IncompleteReadError) and first.partial):
                    raise
                return await asyncio.wait_for(conn.request(method, target, headers or {}, body), self.timeout_s)
        except BaseException:
            conn.close()
            raise
        finally:
            self.idle.put_nowait(conn)

    async def get_json(self, target, headers=None):
        """The JSON body of a 200, or None for any other answer."""
        try:
            status, _, data = await self.request("GET", target, headers)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            return None
        if status != 200:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def close(self):
        while not self.idle.empty():
            self.idle.get_nowait().close()


# ---------------------------------------------------------------------------------------------
# What the node does, sampled once a second.


def rfc3339(ms):
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_ms():
    return int(time.time() * 1000)


def process_cpu_s(pid):
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s():
    """CPU seconds the whole machine spent busy so far (every core; idle and iowait excluded)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


async def others_busy(node_pid):
    """Cores that processes other than the node and this driver keep busy, over one second."""
    m0, n0, d0 = machine_busy_s(), process_cpu_s(node_pid), time.process_time()
    await asyncio.sleep(1)
    return (machine_busy_s() - m0) - (process_cpu_s(node_pid) - n0) - (time.process_time() - d0)


def open_db(path):
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
    db.execute("PRAGMA query_only = 1")
    return db


def queue_counts(db):
    """{tenant: {"waiting": n, "retrying": n, "running": n}} of the async invocations now."""
    out = {}
    rows = db.execute(
        "SELECT tenant, status, count(*) FROM invocations WHERE status IN ('queued', 'failed') "
        "GROUP BY tenant, status"
    ).fetchall()
    rows += db.execute(
        "SELECT tenant, status, count(*) FROM invocations WHERE status = 'running' GROUP BY tenant, status"
    ).fetchall()
    for tenant, status, n in rows:
        key = {"queued": "waiting", "failed": "retrying", "running": "running"}[status]
        out.setdefault(tenant, {"waiting": 0, "retrying": 0, "running": 0})[key] = n
    return out


class Sampler:
    """Once a second: node CPU, queue counts from the database, the tenants' usage, and whatever
    else the run adds (`extra`: name -> coroutine function returning a JSON value)."""

    def __init__(self, args, api, tenants, extra=None):
        self.args, self.api, self.tenants = args, api, tenants
        self.db = open_db(args.db)  # its own: the drain check reads from another thread
        self.extra = extra or {}
        self.samples = []
        self.usage_seen = False

    async def one(self):
        t = now_ms()
        cpu = process_cpu_s(self.args.node_pid)
        counts = asyncio.to_thread(queue_counts, self.db)
        usage = [self.api.get_json(f"/v1/tenants/{tn}/usage", self.args.auth) for tn in self.tenants]
        extra_names = list(self.extra)
        results = await asyncio.gather(counts, *usage, *(self.extra[n]() for n in extra_names),
                                       return_exceptions=True)
        sample = {"t_ms": t, "node_cpu_s": cpu, "driver_cpu_s": time.process_time(), "machine_cpu_s": machine_busy_s()}
        sample["queue"] = results[0] if not isinstance(results[0], BaseException) else None
        sample["usage"] = {}
        for tn, u in zip(self.tenants, results[1:1 + len(self.tenants)]):
            a = u.get("async") if isinstance(u, dict) else None
            if a is not None:
                self.usage_seen = True
            sample["usage"][tn] = a
        for name, r in zip(extra_names, results[1 + len(self.tenants):]):
            sample[name] = None if isinstance(r, BaseException) else r
        self.samples.append(sample)

    async def run(self, stop):
        next_at = time.monotonic()
        while not stop.is_set():
            await self.one()
            next_at += 1
            try:
                await asyncio.wait_for(stop.wait(), max(0, next_at - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        await self.one()


# ---------------------------------------------------------------------------------------------
# Sending async calls on a timetable.


class Sender:
    def __init__(self, args, pool):
        self.args, self.pool = args, pool
        self.sent = []  # (intended_ms, tenant, answered_ms, status)
        self.errors = {}

    async def call(self, intended_ms, tenant, function, path, headers):
        h = {"authorization": f"Bearer {self.args.token}", "prefer": "respond-async"}
        h.update(headers)
        try:
            status, _, _ = await self.pool.request("POST", f"/fn/{tenant}/{function}/{path}", h)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            status = 0
            self.errors[type(e).__name__] = self.errors.get(type(e).__name__, 0) + 1
        self.sent.append((intended_ms, tenant, now_ms(), status))

    async def replay(self, t0_ms, arrivals):
        """Sends each arrival (offset_s, tenant, function, path, headers_fn) at t0 + offset."""
        tasks = set()
        t0_mono = time.monotonic() - (now_ms() - t0_ms) / 1000
        for offset_s, tenant, function, path, headers_fn in arrivals:
            delay = t0_mono + offset_s - time.monotonic()
            if delay > 0.001:
                await asyncio.sleep(delay)
            intended = t0_ms + int(offset_s * 1000)
            task = asyncio.create_task(self.call(intended, tenant, function, path, headers_fn(intended)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)


async def warn_if_busy(args):
    others = await others_busy(args.node_pid)
    if others > 0.2:
        print(f"warning: other processes keep {others:.2f} of {args.cores} cores busy; the node's guests run at "
              f"low priority, so this run will measure them as much as sluice", file=sys.stderr)


def poisson_times(rate_fn, rate_max, duration_s, rng):
    """Arrival times in [0, duration) of a Poisson process of rate rate_fn(t) (by thinning)."""
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate_max)
        if t >= duration_s:
            return out
        if rng.random() * rate_max < rate_fn(t):
            out.append(t)


def even_times(rate_fn, duration_s, step_s=0.001):
    """Arrival times whose count follows the integral of rate_fn exactly (no randomness)."""
    out, acc, t = [], 0.0, 0.0
    while t < duration_s:
        acc += rate_fn(t) * step_s
        while acc >= 1:
            acc -= 1
            out.append(t)
        t += step_s
    return out


def pick(rng, weights):
    """A key of `weights` (dict key -> weight), drawn by weight."""
    x = rng.random() * sum(weights.values())
    for k, w in weights.items():
        x -= w
        if x < 0:
            return k
    return k


def parse_mix(s):
    """`high=0.3,normal=0.5,low=0.2` -> dict."""
    out = {}
    for part in filter(None, s.split(",")):
        k, v = part.split("=")
        out[k.strip()] = float(v)
    return out


async def wait_drained(db, since_ms, limit_s):
    """Waits until no invocation created since `since_ms` is queued, running or retrying, or
    `limit_s` passed. Returns the seconds waited and what was still open."""
    started = time.monotonic()
    while True:
        open_n = await asyncio.to_thread(
            lambda: db.execute(
                "SELECT count(*) FROM invocations WHERE status IN ('queued', 'running', 'failed') "
                "AND created_at >= ?",
                (since_ms,),
            ).fetchone()[0]
        )
        waited = time.monotonic() - started
        if open_n == 0 or waited >= limit_s:
            return waited, open_n
        await asyncio.sleep(0.5)


def run_rows(db, t0_ms, functions):
    marks = ",".join("?" * len(functions))
    cur = db.execute(
        "SELECT tenant, function, status, created_at, started_at, finished_at, cpu_us, deadline, "
        f"criticality, attempts, error_kind FROM invocations WHERE mode = 'async' AND created_at >= ? "
        f"AND function IN ({marks})",
        (t0_ms, *functions),
    )
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def quantile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))
    return xs[i]


def per_second(times_ms, t0_ms, n):
    out = [0] * n
    for t in times_ms:
        i = int((t - t0_ms) // 1000)
        if 0 <= i < n:
            out[i] += 1
    return out


def others_cores(samples, t0_ms, n):
    """Cores used each second by processes other than the node and the driver."""
    m = cpu_per_second(samples, t0_ms, n, "machine_cpu_s")
    nd = cpu_per_second(samples, t0_ms, n, "node_cpu_s")
    d = cpu_per_second(samples, t0_ms, n, "driver_cpu_s")
    return [max(0.0, a - b - c) for a, b, c in zip(m, nd, d)]


def cpu_per_second(samples, t0_ms, n, key="node_cpu_s"):
    """Cores used in each second [t0+i, t0+i+1), interpolated from the cumulative samples."""
    pts = [(s["t_ms"], s[key]) for s in samples]

    def at(t):
        if t <= pts[0][0]:
            return pts[0][1]
        for (ta, ca), (tb, cb) in zip(pts, pts[1:]):
            if ta <= t <= tb:
                return ca + (cb - ca) * (t - ta) / max(1, tb - ta)
        return pts[-1][1]

    return [at(t0_ms + (i + 1) * 1000) - at(t0_ms + i * 1000) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The diurnal run.

CRITICALITIES = ("high", "normal", "low")


async def calibrate(args, sender, db):
    """Guest CPU milliseconds of one `burn` call, from the `cpu_us` the node records: a few calls
    at a low rate, so they do not share a core."""
    n, rate = args.calibration_calls, 10.0
    t0 = now_ms()
    arrivals = [(i / rate, "batch", "jobs", args.call_path, lambda _t: {"sluice-criticality": "high"})
                for i in range(n)]
    await sender.replay(t0, arrivals)
    sender.sent.clear()
    waited, open_n = await wait_drained(db, t0, 30)
    if open_n:
        raise SystemExit(f"calibration: {open_n} of {n} calls still open after {waited:.0f} s")
    cpu = [r["cpu_us"] for r in run_rows(db, t0, ["jobs"]) if r["cpu_us"] and r["status"] == "succeeded"]
    if len(cpu) < n // 2:
        raise SystemExit(f"calibration: only {len(cpu)} of {n} calls succeeded with a cpu time")
    return sorted(cpu)[len(cpu) // 2] / 1000


async def run_diurnal(args):
    api = Pool(args.url, 4)
    load = Pool(args.url, args.connections)
    db = open_db(args.db)
    sender = Sender(args, load)
    cpu_ms = args.cpu_ms_per_call or await calibrate(args, sender, db)
    capacity = args.target * args.cores * 1000 / cpu_ms
    mean = args.rate or args.load * capacity
    period_s = args.minutes * 60
    run_s = period_s * args.days
    a = (args.ratio - 1) / (args.ratio + 1)
    print(f"calibration: {cpu_ms:.1f} ms of guest CPU per {args.call_path} call; capacity at "
          f"{args.target:.0%} of {args.cores} cores = {capacity:.1f} calls/s; mean arrival "
          f"{mean:.1f}/s (peak {mean * (1 + a):.1f}, trough {mean * (1 - a):.1f})", file=sys.stderr)

    def rate(t):
        return mean * (1 + a * math.sin(2 * math.pi * t / period_s))

    rng = random.Random(args.seed)
    times = (poisson_times(rate, mean * (1 + a), run_s, rng) if args.arrivals == "poisson"
             else even_times(rate, run_s))
    web_mix, batch_mix = parse_mix(args.web_criticality), parse_mix(args.batch_criticality)
    arrivals = []
    for t in times:
        if rng.random() < args.web_share:
            crit = pick(rng, web_mix)
            arrivals.append((t, "web", "api", args.call_path,
                             lambda _at, c=crit: {"sluice-criticality": c}))
        else:
            crit = pick(rng, batch_mix)
            window_ms = int(rng.uniform(args.window_min, args.window_max) * period_s * 1000)
            arrivals.append((t, "batch", "jobs", args.call_path,
                             lambda at, c=crit, w=window_ms: {"sluice-criticality": c,
                                                             "sluice-deadline": rfc3339(at + w)}))

    await warn_if_busy(args)
    sampler = Sampler(args, api, ["web", "batch"])
    stop = asyncio.Event()
    t0 = now_ms() + 1000
    sampling = asyncio.create_task(sampler.run(stop))
    driver_cpu0 = time.process_time()
    await sender.replay(t0, arrivals)
    day_end = t0 + run_s * 1000
    await asyncio.sleep(max(0, (day_end - now_ms()) / 1000))
    drained_s, left_open = await wait_drained(db, t0, args.drain_s or period_s / 2)
    driver_cpu = time.process_time() - driver_cpu0
    stop.set()
    await sampling
    api.close()
    load.close()

    rows = await asyncio.to_thread(run_rows, db, t0, ["api", "jobs"])
    run = {
        "kind": "diurnal",
        "config": {k: v for k, v in vars(args).items() if k not in ("token", "auth", "func")},
        "t0_ms": t0,
        "period_s": period_s,
        "days": args.days,
        "calibration_cpu_ms": cpu_ms,
        "capacity_per_s": capacity,
        "mean_per_s": mean,
        "amplitude": a,
        "drained_s": drained_s,
        "left_open": left_open,
        "driver_cpu_s": driver_cpu,
        "sent": sender.sent,
        "send_errors": sender.errors,
        "usage_seen": sampler.usage_seen,
    }
    return analyze_diurnal(run, rows, sampler.samples)


def analyze_diurnal(run, rows, samples):
    t0, period_s, days = run["t0_ms"], run["period_s"], run.get("days", 1)
    run_s = period_s * days
    n = int(run_s + run["drained_s"]) + 2
    accepted = [s for s in run["sent"] if s[3] == 202]
    rejected = [s for s in run["sent"] if s[3] != 202]
    series = {
        "arrivals": per_second([s[0] for s in accepted], t0, n),
        "arrivals_web": per_second([s[0] for s in accepted if s[1] == "web"], t0, n),
        "created": per_second([r["created_at"] for r in rows], t0, n),
        "starts": per_second([r["started_at"] for r in rows if r["started_at"]], t0, n),
        "node_cores": cpu_per_second(samples, t0, n),
        "other_cores": others_cores(samples, t0, n),
        "guest_cores": [0.0] * n,
        "expired": per_second([r["finished_at"] or r["deadline"] for r in rows if r["status"] == "expired"], t0, n),
        "waiting": {}, "running": {},
        "usage": {},
    }
    for r in rows:
        if r["started_at"] and r["cpu_us"]:
            i = int((r["started_at"] - t0) // 1000)
            if 0 <= i < n:
                series["guest_cores"][i] += r["cpu_us"] / 1e6
    for s in samples:
        i = round((s["t_ms"] - t0) / 1000, 1)
        for tn in ("web", "batch"):
            q = (s["queue"] or {}).get(tn, {})
            series["waiting"].setdefault(tn, []).append((i, q.get("waiting", 0) + q.get("retrying", 0)))
            series["running"].setdefault(tn, []).append((i, q.get("running", 0)))
            u = s["usage"].get(tn)
            if u:
                series["usage"].setdefault(tn, []).append((i, u))

    # Buckets of 1/24 of the last day's period ("hours"); with one day the ratio skips the
    # first (warm-up); a later day starts with what the days before left queued.
    hour_s = period_s / 24
    last_day_s = run_s - period_s

    def buckets(per_sec, scale=1.0):
        out = []
        for h in range(24):
            lo, hi = last_day_s + h * hour_s, last_day_s + (h + 1) * hour_s
            total = 0.0
            for i, v in enumerate(per_sec):
                # Each second counts with the part of it that lies in the bucket.
                overlap = max(0.0, min(hi, i + 1) - max(lo, i))
                total += v * overlap
            out.append(total / hour_s * scale)
        return out

    hours = {k: buckets(series[k]) for k in ("arrivals", "created", "starts", "node_cores", "guest_cores")}

    def ratio(xs):
        xs = xs[1:] if days == 1 else xs
        lo, hi = min(xs), max(xs)
        return hi, lo, (hi / lo if lo > 0 else float("inf"))

    tenants = {}
    for tn in ("web", "batch"):
        mine = [r for r in rows if r["tenant"] == tn]
        delays = [(r["started_at"] - r["created_at"]) / 1000 for r in mine if r["started_at"]]
        windows_used = [(r["started_at"] - r["created_at"]) / (r["deadline"] - r["created_at"])
                        for r in mine if r["started_at"] and r["deadline"] and r["deadline"] > r["created_at"]]
        by_status = {}
        for r in mine:
            by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        crit_delays = {}
        for c_i, c in enumerate(CRITICALITIES):
            d = [(r["started_at"] - r["created_at"]) / 1000 for r in mine if r["started_at"] and r["criticality"] == c_i]
            crit_delays[c] = {"n": len(d), "p50": quantile(d, 0.5), "p99": quantile(d, 0.99)}
        tenants[tn] = {
            "calls": len(mine),
            "status": by_status,
            "late_starts": sum(1 for r in mine if r["deadline"] and r["started_at"] and r["started_at"] > r["deadline"]),
            "delay_p50_s": quantile(delays, 0.5),
            "delay_p99_s": quantile(delays, 0.99),
            "delay_max_s": max(delays) if delays else None,
            "window_used_max": max(windows_used) if windows_used else None,
            "by_criticality": crit_delays,
        }
    day = slice(int(last_day_s), int(run_s))
    day_end = t0 + run_s * 1000
    per_call = [1000 * g / st for g, st in zip(hours["guest_cores"][1:], hours["starts"][1:]) if st > 0]
    summary = {
        "cpu_ms_per_call_range": (min(per_call), max(per_call)) if per_call else None,
        "arrivals": ratio(hours["arrivals"]),
        "starts": ratio(hours["starts"]),
        "node_cores": ratio(hours["node_cores"]),
        "guest_cores": ratio(hours["guest_cores"]),
        "accepted": len(accepted),
        "rejected": len(rejected),
        "rejected_statuses": sorted({s[3] for s in rejected}),
        "missed_deadlines": sum(1 for r in rows if r["status"] == "expired"),
        "completed": sum(1 for r in rows if r["status"] == "succeeded"),
        "dead": sum(1 for r in rows if r["status"] == "dead"),
        "rows": len(rows),
        "node_cpu_s": samples[-1]["node_cpu_s"] - samples[0]["node_cpu_s"],
        "node_cores_day_mean": sum(series["node_cores"][day]) / period_s,
        "other_cores_day_mean": sum(series["other_cores"][day]) / period_s,
        # Created during the day, neither started nor expired by its end.
        "backlog_at_day_end": sum(1 for r in rows if (r["started_at"] or 1 << 62) > day_end
                                  and not (r["status"] == "expired" and (r["finished_at"] or 0) <= day_end)),
        "tenants": tenants,
    }
    run.pop("sent")
    return {**run, "series": series, "hours": hours, "summary": summary}


def fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:,.{digits}f}"


def table_diurnal(r):
    s, c = r["summary"], r["config"]
    lines = [
        f"Day compressed into {r['period_s'] / 60:g} min (an hour = {r['period_s'] / 24:g} s)"
        f"{'; ' + str(r.get('days', 1)) + ' days, the last one measured' if r.get('days', 1) > 1 else ''}; "
        f"{c.get('call_path') or 'burn?ms=' + str(c['burn_ms'])} calls, {c['cores']} cores, utilization target {c['target']:.0%}"
        f"{' (not applied: LEGACY node)' if c.get('legacy') else ''}; "
        f"calibrated {r['calibration_cpu_ms']:.1f} ms guest CPU a call, capacity at target "
        f"{r['capacity_per_s']:.1f} calls/s, mean arrival {r['mean_per_s']:.1f}/s ({c['arrivals']}).",
        "",
        f"| per hour-bucket, {'buckets 2-24' if r.get('days', 1) == 1 else 'last day, buckets 1-24'} | peak | trough | peak/trough |",
        "| --- | --- | --- | --- |",
        f"| arrivals, calls/s (driver, accepted) | {fmt(s['arrivals'][0])} | {fmt(s['arrivals'][1])} | **{fmt(s['arrivals'][2], 2)}×** |",
        f"| executed: node process CPU, cores | {fmt(s['node_cores'][0], 2)} | {fmt(s['node_cores'][1], 2)} | **{fmt(s['node_cores'][2], 2)}×** |",
        f"| executed: invocations started/s | {fmt(s['starts'][0])} | {fmt(s['starts'][1])} | {fmt(s['starts'][2], 2)}× |",
        f"| executed: guest CPU by start time, cores | {fmt(s['guest_cores'][0], 2)} | {fmt(s['guest_cores'][1], 2)} | {fmt(s['guest_cores'][2], 2)}× |",
        "",
        "| tenant | calls | succeeded | missed deadline (expired) | other | start delay p50 s | p99 s | max s | most of a window used |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tn, t in s["tenants"].items():
        other = {k: v for k, v in t["status"].items() if k not in ("succeeded", "expired")}
        lines.append(
            f"| {tn} | {t['calls']:,} | {t['status'].get('succeeded', 0):,} | {t['status'].get('expired', 0):,} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(other.items())) or '0'} | {fmt(t['delay_p50_s'], 2)} | "
            f"{fmt(t['delay_p99_s'], 2)} | {fmt(t['delay_max_s'], 2)} | "
            f"{fmt(100 * t['window_used_max'], 0) + '%' if t['window_used_max'] is not None else '-'} |"
        )
    crit = []
    for tn, t in s["tenants"].items():
        for k, v in t["by_criticality"].items():
            if v["n"]:
                crit.append(f"{tn}/{k} {fmt(v['p50'], 2)}/{fmt(v['p99'], 2)}")
    still_open = f" ({r['left_open']} still open)" if r["left_open"] else ""
    worst = max(s["node_cores"][2], s["starts"][2])
    met = worst <= 1.3 and s["missed_deadlines"] == 0
    per_call = s.get("cpu_ms_per_call_range")
    lines += [
        "",
        f"Target (executed peak-to-trough ≤ 1.3× by node CPU and by starts, 0 missed deadlines): "
        f"**{'met' if met else 'not met'}** (node CPU {s['node_cores'][2]:.2f}×, starts {s['starts'][2]:.2f}×, "
        f"{s['missed_deadlines']} missed).",
        f"Start delay p50/p99 s by criticality: {'; '.join(crit)}.",
        (f"Guest CPU per call by hour: {per_call[0]:.1f}-{per_call[1]:.1f} ms (calibrated alone: "
         f"{r['calibration_cpu_ms']:.1f} ms; `burn` spins for wall-clock time, so a call that shares a core "
         f"or waits for a lane slot does less work)." if per_call else ""),
        f"Missed deadlines: **{s['missed_deadlines']}**; completed {s['completed']:,} of {s['rows']:,} "
        f"({s['dead']} dead); {s['rejected']} calls refused at enqueue"
        f"{' ' + str(s['rejected_statuses']) if s['rejected'] else ''}; still waiting to start at the end of the day "
        f"{s['backlog_at_day_end']:,}, drained {fmt(r['drained_s'], 0)} s later"
        f"{still_open}.",
        f"Node process CPU {fmt(s['node_cpu_s'])} s in all, {fmt(s['node_cores_day_mean'], 2)} cores on average over the (last) day; "
        f"other processes (not the node, not the driver) {fmt(s['other_cores_day_mean'], 2)} cores on average. "
        f"Driver CPU {fmt(r['driver_cpu_s'])} s ({fmt(100 * r['driver_cpu_s'] / (r['period_s'] * r.get('days', 1) + r['drained_s']), 1)}% of a core, "
        f"{fmt(1e6 * r['driver_cpu_s'] / max(1, s['accepted'] + s['rejected']), 0)} µs a call, sampling included).",
        "",
        "Executed peak-to-trough: the run's day is cut into 24 buckets of 1/24 of the period; each "
        "bucket's executed load is the node process's CPU time (utime+stime from /proc/PID/stat, "
        "sampled every second, interpolated at bucket edges) divided by the bucket's length; the "
        "ratio is the largest over the smallest of buckets 2-24 (the first is warm-up), or with --days of "
        "all 24 buckets of the last day. Arrivals: "
        "calls the node accepted (202), by the time the driver sent them, same buckets.",
    ]
    return "\n".join(lines)


def plot_diurnal(r, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, se, c = r["summary"], r["series"], r["config"]
    period_s, hour_s, days = r["period_s"], r["period_s"] / 24, r.get("days", 1)
    # The hour buckets are the measured (last) day's.
    last_day_s = period_s * (days - 1)
    n = len(se["arrivals"])
    xs = list(range(n))
    hx = [last_day_s + h * hour_s for h in range(25)]

    def steps(vals):
        return vals + [vals[-1]]

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 10), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 3, 2]})
    title = (f"sluice: a day in {period_s / 60:g} min{f', day {days} of {days} measured' if days > 1 else ''},{chr(10) if days > 1 else ' '}arrivals {s['arrivals'][2]:.2f}× peak-to-trough, executed "
             f"{s['node_cores'][2]:.2f}× (node CPU) and {s['starts'][2]:.2f}× (starts), "
             f"{s['missed_deadlines']} missed deadlines")
    if c.get("legacy"):
        title += "\n(baseline: node without the utilization target)"
    fig.suptitle(title)

    ax1.plot(xs, se["arrivals"], color="tab:blue", alpha=0.25, lw=0.8)
    ax1.plot(xs, se["starts"], color="tab:orange", alpha=0.25, lw=0.8)
    ax1.step(hx, steps(r["hours"]["arrivals"]), where="post", color="tab:blue", lw=2, label="arrivals (calls/s)")
    ax1.step(hx, steps(r["hours"]["starts"]), where="post", color="tab:orange", lw=2, label="invocations started/s")
    ax1.plot(xs, se["arrivals_web"], color="tab:green", alpha=0.5, lw=0.8, label="of the arrivals: web (no deadline)")
    ax1.axhline(r["capacity_per_s"], color="grey", ls="--", lw=1, label=f"capacity at target ({r['capacity_per_s']:.0f}/s)")
    ax1.set_ylabel("calls / s")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.grid(alpha=0.3)

    ax2.plot(xs, se["node_cores"], color="tab:red", alpha=0.3, lw=0.8)
    ax2.step(hx, steps(r["hours"]["node_cores"]), where="post", color="tab:red", lw=2, label="node process CPU (cores)")
    ax2.step(hx, steps(r["hours"]["guest_cores"]), where="post", color="tab:purple", lw=1.5, ls="-.",
             label="guest CPU by start time (cores, cpu_us)")
    arrivals_cores = [v * r["calibration_cpu_ms"] / 1000 for v in r["hours"]["arrivals"]]
    ax2.step(hx, steps(arrivals_cores), where="post", color="tab:blue", lw=1, ls=":", label="arrivals × CPU per call (cores)")
    ax2.axhline(c["target"] * c["cores"], color="grey", ls="--", lw=1, label=f"utilization target ({c['target']:.0%} of {c['cores']} cores)")
    ax2.plot(xs, se["other_cores"], color="grey", alpha=0.6, lw=0.8, label="other processes (cores)")
    util = [(t, u["node_utilization"] * c["cores"]) for t, u in se["usage"].get("batch", [])
            if isinstance(u.get("node_utilization"), (int, float))]
    if util:
        ax2.plot([p[0] for p in util], [p[1] for p in util], color="tab:olive", lw=1,
                 label="guests' share × cores, as the scheduler sees it (/usage)")
    ax2.axhline(c["cores"], color="black", lw=0.8)
    ax2.set_ylabel("cores")
    ax2.legend(loc="upper right", fontsize=8)
    ax2.grid(alpha=0.3)

    for tn, color in (("batch", "tab:brown"), ("web", "tab:green")):
        pts = se["waiting"].get(tn, [])
        ax3.plot([p[0] for p in pts], [p[1] for p in pts], color=color, label=f"{tn}: waiting to start")
    exp_cum, acc = [], 0
    for v in se["expired"]:
        acc += v
        exp_cum.append(acc)
    if acc:
        ax3b = ax3.twinx()
        ax3b.plot(xs, exp_cum, color="black", ls="--", lw=1, label="missed deadlines (cumulative)")
        ax3b.set_ylabel("missed deadlines")
        ax3b.legend(loc="upper center", fontsize=8)
    ax3.set_ylabel("invocations")
    ax3.set_xlabel(f"seconds since the start of the {'first ' if days > 1 else ''}day (an hour = {hour_s:g} s)")
    ax3.legend(loc="upper left", fontsize=8)
    ax3.grid(alpha=0.3)
    for d in range(1, days + 1):
        for ax in (ax1, ax2, ax3):
            ax.axvline(d * period_s, color="black", lw=0.8, ls=":")
        ax3.text(d * period_s, ax3.get_ylim()[1] * 0.95, f" end of day {d}" if days > 1 else " end of day",
                 fontsize=8, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The downstream run.


async def run_downstream(args):
    api = Pool(args.url, 4)
    load = Pool(args.url, args.connections)
    stub = Pool(args.stub_url, 2)
    db = open_db(args.db)
    sender = Sender(args, load)
    stats0 = await stub.get_json("/stats")
    if stats0 is None:
        raise SystemExit(f"the downstream stub at {args.stub_url} does not answer /stats")
    capacity, latency_ms = stats0["capacity"], stats0["latency_ms"]
    capacity_rps = capacity * 1000 / latency_ms
    rate = args.rate or args.load * capacity_rps
    run_s = args.minutes * 60
    halve_at, restore_at = run_s / 3, 2 * run_s / 3
    print(f"downstream: capacity {capacity} in flight × {latency_ms:g} ms = {capacity_rps:.0f} req/s, halved to "
          f"{capacity // 2} at {halve_at:.0f} s, restored at {restore_at:.0f} s; arrivals {rate:.1f}/s", file=sys.stderr)
    target = urllib.parse.quote(args.stub_url.rstrip("/") + "/", safe="")
    path = f"report?url={target}"
    rng = random.Random(args.seed)
    times = (poisson_times(lambda _t: rate, rate, run_s, rng) if args.arrivals == "poisson"
             else even_times(lambda _t: rate, run_s))
    arrivals = [(t, "shop", "notify", path, lambda _at: {}) for t in times]

    downstreams_seen = [False]

    async def downstreams():
        v = await api.get_json("/v1/tenants/shop/functions/notify/downstreams", args.auth)
        if v is not None:
            downstreams_seen[0] = True
        return v

    await warn_if_busy(args)
    sampler = Sampler(args, api, ["shop"], {"stub": lambda: stub.get_json("/stats"),
                                                  "downstreams": downstreams})
    stop = asyncio.Event()
    t0 = now_ms() + 1000
    sampling = asyncio.create_task(sampler.run(stop))

    async def control():
        for at_s, cap in ((halve_at, capacity // 2), (restore_at, capacity)):
            await asyncio.sleep(max(0, (t0 + at_s * 1000 - now_ms()) / 1000))
            status, _, _ = await stub.request("POST", f"/control?capacity={cap}")
            assert status == 200, status

    driver_cpu0 = time.process_time()
    await asyncio.gather(sender.replay(t0, arrivals), control())
    await asyncio.sleep(max(0, (t0 + run_s * 1000 - now_ms()) / 1000))
    drained_s, left_open = await wait_drained(db, t0, args.drain_s or run_s / 3)
    driver_cpu = time.process_time() - driver_cpu0
    stop.set()
    await sampling
    for p in (api, load, stub):
        p.close()
    rows = await asyncio.to_thread(run_rows, db, t0, ["notify"])
    run = {
        "kind": "downstream",
        "config": {k: v for k, v in vars(args).items() if k not in ("token", "auth", "func")},
        "t0_ms": t0,
        "run_s": run_s,
        "halve_at_s": halve_at,
        "restore_at_s": restore_at,
        "capacity": capacity,
        "latency_ms": latency_ms,
        "capacity_rps": capacity_rps,
        "rate_per_s": rate,
        "drained_s": drained_s,
        "left_open": left_open,
        "driver_cpu_s": driver_cpu,
        "sent": sender.sent,
        "send_errors": sender.errors,
        "downstreams_seen": downstreams_seen[0],
        "usage_seen": sampler.usage_seen,
    }
    return analyze_downstream(run, rows, sampler.samples)


# The window of the error rate that must stay under 1%: wide enough that one overshoot of an
# adaptive limit probing upwards (a few 503s) does not count as overload.
ERR_WINDOW_S = 10


def downstream_limit(v):
    """(limit, in_flight) summed over the hosts of a /downstreams answer: a list of
    {host, limit, in_flight, ...}, or an object holding such a list under `downstreams`."""
    if isinstance(v, dict):
        v = v.get("downstreams", [])
    if not isinstance(v, list) or not v:
        return None
    return (sum(d.get("limit", 0) or 0 for d in v), sum(d.get("in_flight", 0) or 0 for d in v))


def analyze_downstream(run, rows, samples):
    t0, run_s = run["t0_ms"], run["run_s"]
    accepted = [s for s in run["sent"] if s[3] == 202]
    rejected = [s for s in run["sent"] if s[3] != 202]
    # Per-second counts of the stub from its cumulative counters, at the sample times.
    sec = []
    prev = prev_sample = None
    for s in samples:
        st = s.get("stub")
        x = round((s["t_ms"] - t0) / 1000, 1)
        q = (s["queue"] or {}).get("shop", {})
        lim = downstream_limit(s.get("downstreams"))
        row = {"t": x, "waiting": q.get("waiting", 0), "retrying": q.get("retrying", 0), "running": q.get("running", 0),
               "limit": lim[0] if lim else None, "sluice_in_flight": lim[1] if lim else None,
               "node_cpu_s": s["node_cpu_s"]}
        if prev_sample:
            dt = max(0.001, (s["t_ms"] - prev_sample["t_ms"]) / 1000)
            row["other_cores"] = max(0.0, ((s["machine_cpu_s"] - prev_sample["machine_cpu_s"])
                                           - (s["node_cpu_s"] - prev_sample["node_cpu_s"])
                                           - (s["driver_cpu_s"] - prev_sample["driver_cpu_s"])) / dt)
        else:
            row["other_cores"] = 0.0
        prev_sample = s
        if st and prev:
            dt = max(0.001, (st["t_ms"] - prev["t_ms"]) / 1000)
            row.update(ok=(st["ok"] - prev["ok"]) / dt, rejected=(st["rejected"] - prev["rejected"]) / dt,
                       capacity=st["capacity"], stub_in_flight=st["in_flight"])
        if st:
            prev = st
        sec.append(row)
    sec = [r for r in sec if "ok" in r]

    def err(rs):
        ok, rej = sum(r["ok"] for r in rs), sum(r["rejected"] for r in rs)
        return rej / (ok + rej) if ok + rej else 0.0

    full, half = run["capacity"], run["capacity"] // 2
    phases = [("before", 0, run["halve_at_s"], full), ("halved", run["halve_at_s"], run["restore_at_s"], half),
              ("restored", run["restore_at_s"], run_s, full), ("drain", run_s, run_s + run["drained_s"] + 1, full)]
    table = []
    for name, lo, hi, cap in phases:
        rs = [r for r in sec if lo < r["t"] <= hi]
        if not rs:
            continue
        span = len(rs)
        limits = [r["limit"] for r in rs if r["limit"] is not None]
        table.append({
            "phase": name, "from_s": lo, "to_s": hi,
            "capacity_rps": cap * 1000 / run["latency_ms"],
            "requests_per_s": sum(r["ok"] + r["rejected"] for r in rs) / span,
            "ok_per_s": sum(r["ok"] for r in rs) / span,
            "error_rate": err(rs),
            "error_rate_second_half": err(rs[len(rs) // 2:]),
            "backlog_end": rs[-1]["waiting"] + rs[-1]["retrying"],
            "backlog_max": max(r["waiting"] + r["retrying"] for r in rs),
            "limit_mean": sum(limits) / len(limits) if limits else None,
        })
    # Time from the halving until the 10-second trailing error rate is under 1% for good (until the
    # restore).
    halved = [r for r in sec if run["halve_at_s"] < r["t"] <= run["restore_at_s"]]
    adapted_s = None
    if halved:
        last_bad = None
        for i in range(len(halved)):
            if err(halved[max(0, i - ERR_WINDOW_S + 1):i + 1]) >= 0.01:
                last_bad = i
        if last_bad is None:
            adapted_s = 0.0
        elif last_bad < len(halved) - 1:
            adapted_s = halved[last_bad + 1]["t"] - run["halve_at_s"]
    # The backlog drains when it falls back to what it was before the halving (its 95th
    # percentile then, plus one).
    before = sorted(r["waiting"] + r["retrying"] for r in sec if r["t"] <= run["halve_at_s"])
    normal = (before[int(0.95 * (len(before) - 1))] if before else 0) + 1
    drained_after_s = None
    for r in sec:
        if r["t"] > run["restore_at_s"] and r["waiting"] + r["retrying"] <= normal:
            drained_after_s = r["t"] - run["restore_at_s"]
            break
    by_status = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    attempts = [r["attempts"] for r in rows if r["attempts"]]
    summary = {
        "phases": table,
        "adapted_s": adapted_s,
        "backlog_normal": normal,
        "drained_after_restore_s": drained_after_s,
        "status": by_status,
        "attempts_mean": sum(attempts) / len(attempts) if attempts else None,
        "attempts_max": max(attempts) if attempts else None,
        "accepted": len(accepted),
        "rejected": len(rejected),
        "node_cpu_s": samples[-1]["node_cpu_s"] - samples[0]["node_cpu_s"],
        "other_cores_mean": sum(x["other_cores"] for x in sec) / max(1, len(sec)),
    }
    run.pop("sent")
    return {**run, "series": sec, "summary": summary}


def table_downstream(r):
    s, c = r["summary"], r["config"]
    lines = [
        f"Downstream stub: {r['capacity']} requests in flight × {r['latency_ms']:g} ms = {r['capacity_rps']:.0f} req/s, "
        f"halved at {r['halve_at_s']:.0f} s, restored at {r['restore_at_s']:.0f} s; async `report` calls at "
        f"{r['rate_per_s']:.1f}/s ({c['arrivals']}) for {r['run_s']:.0f} s, then a drain of at most "
        f"{(c['drain_s'] or r['run_s'] / 3):.0f} s{'; LEGACY node (no adaptive limits)' if c.get('legacy') else ''}.",
        "",
        "| phase | downstream capacity req/s | requests/s reaching it | 2xx/s | 503 rate | 503 rate, 2nd half | sluice's limit (mean) | backlog max | backlog at end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in s["phases"]:
        lines.append(
            f"| {p['phase']} ({p['from_s']:.0f}-{p['to_s']:.0f} s) | {p['capacity_rps']:.0f} | {p['requests_per_s']:.1f} | "
            f"{p['ok_per_s']:.1f} | {100 * p['error_rate']:.1f}% | {100 * p['error_rate_second_half']:.1f}% | "
            f"{fmt(p['limit_mean'])} | {p['backlog_max']:,} | {p['backlog_end']:,} |"
        )
    adapted = (f"{s['adapted_s']:.0f} s after the halving" if s["adapted_s"] is not None
               else "not before the restore")
    drained = (f"{s['drained_after_restore_s']:.0f} s after the restore" if s["drained_after_restore_s"] is not None
               else "not by the end of the drain")
    lines += [
        "",
        f"503 rate back under 1% ({ERR_WINDOW_S} s trailing window, for good): **{adapted}**. Backlog (waiting + "
        f"awaiting a retry) back to its level before the halving (≤ {s['backlog_normal']}): **{drained}**.",
        f"Invocations: {', '.join(f'{k} {v:,}' for k, v in sorted(s['status'].items()))}; attempts mean "
        f"{fmt(s['attempts_mean'], 2)}, max {s['attempts_max']}; {s['rejected']} calls refused at enqueue. "
        f"/downstreams {'answered' if r['downstreams_seen'] else 'did not answer (no limit plotted)'}.",
        f"Node process CPU {fmt(s['node_cpu_s'])} s; other processes (the stub among them) "
        f"{fmt(s['other_cores_mean'], 2)} cores on average. Driver CPU {fmt(r['driver_cpu_s'])} s "
        f"({fmt(100 * r['driver_cpu_s'] / (r['run_s'] + r['drained_s']), 1)}% of a core, "
        f"{fmt(1e6 * r['driver_cpu_s'] / max(1, s['accepted'] + s['rejected']), 0)} µs a call, sampling included).",
    ]
    return "\n".join(lines)


def plot_downstream(r, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    se, s = r["series"], r["summary"]
    t = [x["t"] for x in se]
    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2, 2]})
    ax1, ax2, ax3, ax4 = axes
    adapted = f"{s['adapted_s']:.0f} s" if s["adapted_s"] is not None else "never"
    title = (f"sluice: a downstream's capacity halved at {r['halve_at_s']:.0f} s, restored at {r['restore_at_s']:.0f} s; "
             f"503s under 1% after: {adapted}")
    if r["config"].get("legacy"):
        title += "\n(baseline: node without adaptive downstream limits)"
    fig.suptitle(title)
    ax1.stackplot(t, [x["ok"] for x in se], [x["rejected"] for x in se], colors=["tab:green", "tab:red"],
                  labels=["answered 2xx", "answered 503"], alpha=0.7)
    sched_t = [0, r["halve_at_s"], r["restore_at_s"], t[-1] if t else r["run_s"]]
    sched_c = [r["capacity"], r["capacity"] // 2, r["capacity"], r["capacity"]]
    ax1.step(sched_t, [c * 1000 / r["latency_ms"] for c in sched_c], where="post", color="black", ls="--", lw=1,
             label="downstream capacity (req/s)")
    ax1.axhline(r["rate_per_s"], color="tab:blue", lw=1, ls=":", label=f"new calls ({r['rate_per_s']:.0f}/s)")
    ax1.set_ylabel("requests / s reaching it")
    ax1.legend(loc="upper right", fontsize=8)

    rate = []
    for i in range(len(se)):
        w = se[max(0, i - ERR_WINDOW_S + 1):i + 1]
        ok, rej = sum(x["ok"] for x in w), sum(x["rejected"] for x in w)
        rate.append(100 * rej / (ok + rej) if ok + rej else float("nan"))
    ax2.plot(t, [100 * x["rejected"] / (x["ok"] + x["rejected"]) if x["ok"] + x["rejected"] else float("nan") for x in se],
             color="tab:red", alpha=0.3, lw=0.8, label="503 % each second")
    ax2.plot(t, rate, color="tab:red", lw=1.8, label=f"503 %, {ERR_WINDOW_S} s trailing")
    ax2.axhline(1, color="black", ls="--", lw=1, label="1%")
    ax2.set_yscale("symlog", linthresh=1)
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("503 %")
    ax2.legend(loc="upper right", fontsize=8)

    ax3.step(sched_t, sched_c, where="post", color="black", ls="--", lw=1, label="downstream capacity (in flight)")
    ax3.plot(t, [x["stub_in_flight"] for x in se], color="tab:green", lw=1, label="in flight at the downstream (sampled)")
    if any(x["limit"] is not None for x in se):
        ax3.plot(t, [x["limit"] for x in se], color="tab:purple", lw=1.8, label="sluice's adaptive limit")
    ax3.set_ylabel("concurrent requests")
    ax3.legend(loc="best", fontsize=8)

    ax4.plot(t, [x["waiting"] for x in se], color="tab:brown", label="waiting to start")
    ax4.plot(t, [x["retrying"] for x in se], color="tab:orange", label="failed, awaiting a retry")
    ax4.plot(t, [x["running"] for x in se], color="tab:blue", lw=0.8, label="running")
    ax4.set_ylabel("invocations")
    ax4.set_xlabel("seconds since the start of the run")
    ax4.legend(loc="center right", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        for x in (r["halve_at_s"], r["restore_at_s"]):
            ax.axvline(x, color="grey", lw=0.8, ls=":")
        ax.axvline(r["run_s"], color="black", lw=0.8, ls=":")
    for x, label in ((0, "capacity full"), (r["halve_at_s"], "halved"), (r["restore_at_s"], "restored"),
                     (r["run_s"], "new calls stop")):
        ax4.text(x, ax4.get_ylim()[1] * 0.95, f" {label}", fontsize=8, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def report(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    name = result["kind"]
    table = table_diurnal(result) if name == "diurnal" else table_downstream(result)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    png = os.path.join(out_dir, f"{name}.png")
    (plot_diurnal if name == "diurnal" else plot_downstream)(result, png)
    print(table)
    print(f"\nwrote {png}, {name}.md and {name}.json in {out_dir}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", required=True, help="the node, http://127.0.0.1:PORT")
    common.add_argument("--token", default=os.environ.get("SLUICE_TOKEN"), help="admin key (default $SLUICE_TOKEN)")
    common.add_argument("--db", required=True, help="the node's sluice.db")
    common.add_argument("--node-pid", type=int, required=True, help="the node's pid, for its CPU time")
    common.add_argument("--cores", type=int, default=os.cpu_count(), help="the node's cores (default: this machine's)")
    common.add_argument("--minutes", type=float, default=4, help="length of the day / of the run (default 4)")
    common.add_argument("--out", default="bench/results", help="folder of the PNG, .md and .json (default bench/results)")
    common.add_argument("--seed", type=int, default=1, help="of the arrivals and their mix (default 1)")
    common.add_argument("--arrivals", choices=("poisson", "even"), default="poisson",
                        help="a Poisson process of the rate, or evenly spaced by it (default poisson)")
    common.add_argument("--connections", type=int, default=16, help="keep-alive connections of the load (default 16)")
    common.add_argument("--rate", type=float, help="mean arrivals/s (default: from --load)")
    common.add_argument("--drain-s", type=float, help="longest wait, s, for the queue to drain after the run (default: 1/2 of the day, 1/3 of the downstream run)")
    common.add_argument("--legacy", action="store_true", help="the node has no scheduling features (labels only)")

    d = sub.add_parser("diurnal", parents=[common])
    d.add_argument("--days", type=int, default=1, help="days replayed back to back; the last is measured, "
                   "so it starts with the backlog the others left, as a node's every day does (default 1)")
    d.add_argument("--burn-ms", type=int, default=20, help="each call's burn?ms=N (default 20)")
    d.add_argument("--call-path", help="the guest path of each call (default burn?ms=BURN_MS; a mode that "
                   "does a fixed amount of work would keep its CPU time constant under contention)")
    d.add_argument("--target", type=float, default=0.8, help="the node's --utilization-target (default 0.8)")
    d.add_argument("--load", type=float, default=1.0, help="mean arrivals as a fraction of the capacity at target (default 1.0)")
    d.add_argument("--ratio", type=float, default=4.3, help="peak-to-trough of the arrivals (default 4.3)")
    d.add_argument("--web-share", type=float, default=0.25, help="fraction of the calls that are web's (default 0.25)")
    d.add_argument("--web-criticality", default="high=0.3,normal=0.5,low=0.2", help="mix of web's calls (default %(default)s)")
    d.add_argument("--batch-criticality", default="high=0.1,normal=0.4,low=0.5", help="mix of batch's calls (default %(default)s)")
    d.add_argument("--window-min", type=float, default=0.5, help="shortest batch start window, in periods (default 0.5)")
    d.add_argument("--window-max", type=float, default=0.75, help="longest batch start window, in periods (default 0.75)")
    d.add_argument("--calibration-calls", type=int, default=20, help="calls measured before the day, 10/s (default 20)")
    d.add_argument("--cpu-ms-per-call", type=float, help="guest CPU of one call: skip the calibration")

    w = sub.add_parser("downstream", parents=[common])
    w.add_argument("--stub-url", required=True)
    w.add_argument("--load", type=float, default=0.6, help="arrivals as a fraction of the stub's full capacity (default 0.6)")

    rp = sub.add_parser("replot")
    rp.add_argument("json")
    rp.add_argument("--out")
    args = p.parse_args()

    if args.mode == "replot":
        with open(args.json) as f:
            result = json.load(f)
        report(result, args.out or os.path.dirname(args.json) or ".")
        return
    if not args.token:
        p.error("--token or SLUICE_TOKEN is needed")
    args.auth = {"authorization": f"Bearer {args.token}"}
    if args.mode == "diurnal" and not args.call_path:
        args.call_path = f"burn?ms={args.burn_ms}"
    result = asyncio.run(run_diurnal(args) if args.mode == "diurnal" else run_downstream(args))
    report(result, args.out)


if __name__ == "__main__":
    main()
