#!/usr/bin/env python3
"""Density benchmark driver: N distinct functions on one node (see bench/density.sh).

Deploys N copies of the hello component, each made distinct by a custom section that holds its
number (the code is the same, the digest is not), then measures what the node costs: RSS idle
after deploy, after one call each and after a restart; time from restart to listening; latency of
the first call of a function not called since the restart; hot-call throughput (wrk) over a few
functions while the code cache holds 10% of them; disk use.

The driver is one Python process with keep-alive connections (no process per request); its own
cost per call is shown by the hot latency row, measured the same way.
"""

import concurrent.futures
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

SLUICE = os.environ.get("SLUICE", "target/release/sluice")


def leb128(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v == 0:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def distinct(wasm, n):
    name = b"sluice-distinct"
    payload = leb128(len(name)) + name + n.to_bytes(8, "little")
    return wasm + b"\x00" + leb128(len(payload)) + payload


class Conn:
    """One keep-alive HTTP/1.1 connection per thread."""

    local = threading.local()

    def __init__(self, url, token):
        u = urllib.parse.urlparse(url)
        self.host, self.port, self.token = u.hostname, u.port, token

    def conn(self):
        c = getattr(self.local, "c", None)
        if c is None or getattr(self.local, "for_port", None) != self.port:
            c = http.client.HTTPConnection(self.host, self.port, timeout=120)
            self.local.c, self.local.for_port = c, self.port
        return c

    def request(self, method, path, body=None, headers=None):
        h = {"Authorization": f"Bearer {self.token}"}
        h.update(headers or {})
        for attempt in range(3):
            c = self.conn()
            try:
                c.request(method, path, body=body, headers=h)
                r = c.getresponse()
                data = r.read()
                return r.status, data
            except (ConnectionError, http.client.HTTPException):
                c.close()
                self.local.c = None
                if attempt == 2:
                    raise


class Node:
    def __init__(self, data_dir, extra):
        self.data_dir, self.extra, self.proc = data_dir, extra, None

    def start(self):
        """Starts the node; returns seconds from spawn to its `listening on` line."""
        t0 = time.monotonic()
        self.log = open(os.path.join(self.data_dir, "log"), "ab")
        self.proc = subprocess.Popen(
            [SLUICE, "serve", "--listen", "127.0.0.1:0", "--data-dir", os.path.join(self.data_dir, "n"),
             "--tenant-rate", "10000000"] + self.extra,
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        for line in self.proc.stderr:
            self.log.write(line)
            m = re.search(rb"listening on (http://[0-9.:]+)", line)
            if m:
                took = time.monotonic() - t0
                self.url = m.group(1).decode()
                threading.Thread(target=self._drain, daemon=True).start()
                break
        else:
            sys.exit("sluice did not start: see " + self.log.name)
        self.token = open(os.path.join(self.data_dir, "n", "admin.token")).read().strip()
        self.http = Conn(self.url, self.token)
        return took

    def _drain(self):
        for line in self.proc.stderr:
            self.log.write(line)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)

    def status(self):
        out = {}
        for line in open(f"/proc/{self.proc.pid}/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
        return out

    def settle(self):
        """Lets allocator caches and the cache's pending work settle before RSS is read."""
        time.sleep(2)
        self.http.request("GET", "/v1/node")
        return self.status()


def mib(b):
    return f"{b / 2**20:.1f}"


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


def deploy_all(node, wasm, n, threads):
    def one(i):
        status, body = node.http.request("POST", "/v1/tenants/default/blobs", body=distinct(wasm, i))
        assert status == 201, body
        digest = json.loads(body)["digest"]
        req = json.dumps({"digest": digest, "config": {"public": True}})
        status, body = node.http.request("POST", f"/v1/tenants/default/functions/f{i}/versions", body=req,
                                         headers={"Content-Type": "application/json"})
        assert status == 201, body
        return json.loads(body)["compile_ms"]

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def call_all(node, indexes, threads=1):
    """Calls each function once; returns the latency of each, in ms."""
    def one(i):
        t0 = time.perf_counter()
        status, body = node.http.request("GET", f"/fn/default/f{i}/")
        took = (time.perf_counter() - t0) * 1000
        assert status == 200 and body == b"hello from sluice\n", (status, body)
        return took

    if threads == 1:
        return [one(i) for i in indexes]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, indexes))


def run_wrk(url, script, duration):
    """wrk -c50 with `script`; returns (req/s, p99 ms)."""
    out = subprocess.run(["wrk", "-t1", "-c50", f"-d{duration}", "--latency", "-s", script, url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    p99 = re.search(r"99%\s+([0-9.]+)(us|ms|s)", out)
    return rps, float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]


def du(path):
    return int(subprocess.check_output(["du", "-sb", path]).split()[0])


def main():
    n = int(sys.argv[1])
    hello = open(sys.argv[2], "rb").read()
    duration = os.environ.get("DURATION", "10s")
    hot = min(10, n)
    cache_entries = max(1, n // 10)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        node = Node(d, ["--code-cache-entries", str(cache_entries)])
        node.start()
        base = node.settle()
        t0 = time.monotonic()
        compile_ms = deploy_all(node, hello, n, threads=2)
        deploy_s = time.monotonic() - t0
        # Deploys load what they compile; a node that restarted has loaded nothing. Idle after
        # deploy is what the deploys left in the cache (at most the cache's bound).
        after_deploy = node.settle()
        call_all(node, range(n), threads=2)
        after_calls = node.settle()
        info_before = json.loads(node.http.request("GET", "/v1/node")[1])
        node.stop()

        listening_s = node.start()
        after_restart = node.settle()
        # First calls of functions never called since the restart, one at a time.
        sample = list(range(0, n, max(1, n // 1000)))
        cold = call_all(node, sample)
        # The same driver on a hot function: what the driver and a hot call cost together.
        hot_lat = call_all(node, [0] * 1000)
        info = json.loads(node.http.request("GET", "/v1/node")[1])

        # Hot throughput: wrk over `hot` functions (all fit in the cache) while the cache holds
        # 10% of the deployed functions.
        script = os.path.join(d, "hot.lua")
        with open(script, "w") as f:
            f.write("local i = 0\nrequest = function()\n  i = i + 1\n"
                    f"  return wrk.format('GET', '/fn/default/f' .. (i % {hot}) .. '/')\nend\n")
        rps, p99_ms = run_wrk(node.url, script, duration)
        after_load = node.status()
        # The same load while deploys of new components run two at a time: compiles are on the
        # compile pool (one at a time, nice 10), so they take what the calls leave.
        stop = threading.Event()
        burst = []

        def deploy_burst(i):
            while not stop.is_set():
                status, body = node.http.request("POST", "/v1/tenants/default/blobs", body=distinct(hello, i))
                digest = json.loads(body)["digest"]
                req = json.dumps({"digest": digest, "config": {"public": True}})
                node.http.request("POST", f"/v1/tenants/default/functions/b{i}/versions", body=req,
                                  headers={"Content-Type": "application/json"})
                burst.append(i)
                i += 1

        deployers = [threading.Thread(target=deploy_burst, args=(n + k * 10**6,)) for k in range(2)]
        for t in deployers:
            t.start()
        burst_rps, burst_p99_ms = run_wrk(node.url, script, duration)
        stop.set()
        for t in deployers:
            t.join()
        node.stop()
        disk = du(os.path.join(d, "n"))
        artifacts = du(os.path.join(d, "n", "artifacts"))

    per = lambda s: (s["VmRSS"] - base["VmRSS"]) / n
    print(f"### {n} distinct functions (code cache: {cache_entries} entries)\n")
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| node RSS before any deploy | {mib(base['VmRSS'])} MiB |")
    print(f"| deploy of {n} (2 at a time), compile p50 | {deploy_s:.1f} s, {statistics.median(compile_ms):.0f} ms |")
    print(f"| RSS idle after deploy | {mib(after_deploy['VmRSS'])} MiB (anon {mib(after_deploy['RssAnon'])}), "
          f"{per(after_deploy) / 1024:.1f} KiB per function |")
    print(f"| RSS after one call each | {mib(after_calls['VmRSS'])} MiB (anon {mib(after_calls['RssAnon'])}), "
          f"{per(after_calls) / 1024:.1f} KiB per function |")
    print(f"| restart to listening | {listening_s * 1000:.0f} ms |")
    print(f"| RSS idle after restart | {mib(after_restart['VmRSS'])} MiB (anon {mib(after_restart['RssAnon'])}), "
          f"{per(after_restart) / 1024:.1f} KiB per function |")
    print(f"| first call of a cold function ({len(cold)} sampled), p50 / p99 | "
          f"{statistics.median(cold):.2f} / {pct(cold, 0.99):.2f} ms |")
    print(f"| hot call through the same driver, p50 / p99 | "
          f"{statistics.median(hot_lat):.2f} / {pct(hot_lat, 0.99):.2f} ms |")
    print(f"| hot throughput, wrk -c50 over {hot} functions | {rps:,.0f} req/s, p99 {p99_ms:.2f} ms |")
    print(f"| the same, while deploys run 2 at a time | {burst_rps:,.0f} req/s, p99 {burst_p99_ms:.2f} ms, "
          f"{len(burst)} deploys done |")
    print(f"| RSS after the hot load | {mib(after_load['VmRSS'])} MiB |")
    print(f"| disk: data dir / artifacts | {mib(disk)} / {mib(artifacts)} MiB |")
    c = info["code_cache"]
    print(f"| code cache after restart + calls | {c['entries']} entries, {c['misses']} misses, "
          f"{c['evictions']} evictions, {c['loads']} loads (mean {c['load_us_total'] / max(1, c['loads']) / 1000:.2f} ms) |")
    cb = info_before["code_cache"]
    print(f"| code cache before restart | {cb['entries']} entries, {cb['evictions']} evictions, "
          f"{cb['compiles']} compiles |")


if __name__ == "__main__":
    main()
