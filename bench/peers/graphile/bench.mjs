// graphile-worker peer for bench/async-pg.sh: the same async workload as sluice's (50 clients, each
// enqueueing its own no-op job one after another), measured from the first enqueue to the last
// completion, on the same PostgreSQL server.
//
//   node bench.mjs --url postgres://postgres@127.0.0.1:5432/DB (--jobs N | --duration 10s)
//                  [--clients 50] [--concurrency 24] [--local-queue 500] [--client-pool 10]
//
// Layout, as graphile-worker's docs recommend for throughput: the worker (runner) runs in its own
// process (forked from this one), separate from the "application" that enqueues; this process
// runs the 50 client loops, all sharing one pg.Pool (10 connections: pg's default, and a little
// faster here than 20 or 50) through one WorkerUtils (addJob → the graphile_worker.add_job SQL
// function, which NOTIFYs the worker); an enqueue's latency includes waiting for a pool connection. The worker uses the settings of
// graphile-worker's own performance page: concurrentJobs, maxPoolSize = concurrency + 1, a local
// queue (batch fetching), and batched completion (completeJobBatchDelay = 0).
//
// The task `noop` counts completions in the worker process; once the clients are done, this
// process tells the worker how many jobs were enqueued and the worker answers when that many have
// completed, with the time of the last completion. Both processes use epoch time at sub-ms
// resolution (performance.timeOrigin + performance.now()).
//
// CPU: process.cpuUsage() of the worker process and of this (client) process, and PostgreSQL's
// from /proc (utime+stime of every process named `postgres`, plus the postmaster's cutime+cstime
// so that backends which exit during the run, e.g. autovacuum workers, are still counted).
//
// Prints one JSON line.
import { fork } from "node:child_process";
import { readFileSync, readdirSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import pg from "pg";
import { Logger, makeWorkerUtils, run, runMigrations } from "graphile-worker";

const now = () => performance.timeOrigin + performance.now();

function parseArgs(argv) {
  const a = {
    url: process.env.DATABASE_URL,
    jobs: 0,
    duration: 0,
    clients: 50,
    concurrency: 24,
    localQueue: -1, // -1: 500, as on graphile-worker's performance page
    clientPool: 10, // pg.Pool's default; measured a little faster here than 20 or 50
    worker: false,
  };
  for (let i = 2; i < argv.length; i++) {
    const k = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) throw new Error(`${k} needs a value`);
      return argv[++i];
    };
    switch (k) {
      case "--url": a.url = v(); break;
      case "--jobs": a.jobs = parseInt(v(), 10); break;
      case "--duration": a.duration = parseDuration(v()); break;
      case "--clients": a.clients = parseInt(v(), 10); break;
      case "--concurrency": a.concurrency = parseInt(v(), 10); break;
      case "--local-queue": a.localQueue = parseInt(v(), 10); break;
      case "--client-pool": a.clientPool = parseInt(v(), 10); break;
      case "--worker": a.worker = true; break;
      default: throw new Error(`unknown argument ${k}`);
    }
  }
  if (!a.url) throw new Error("--url (or DATABASE_URL) is needed");
  if (!a.worker && !(a.jobs > 0) === !(a.duration > 0)) throw new Error("give exactly one of --jobs N and --duration D");
  if (a.localQueue < 0) a.localQueue = 500;
  if (!(a.clientPool > 0)) throw new Error("--client-pool must be positive");
  return a;
}

// "10s", "500ms", "1m", or plain seconds → ms.
function parseDuration(s) {
  const m = /^([0-9.]+)(ms|s|m)?$/.exec(s);
  if (!m) throw new Error(`bad duration ${s}`);
  return parseFloat(m[1]) * ({ ms: 1, s: 1000, m: 60000 }[m[2] ?? "s"]);
}

const cpuMs = (u) => (u.user + u.system) / 1000;

// CPU ms of all PostgreSQL processes (see the header).
const CLK_TCK = (() => {
  try { return parseInt(execFileSync("getconf", ["CLK_TCK"]).toString(), 10) || 100; } catch { return 100; }
})();
function postgresCpuMs() {
  let ticks = 0;
  for (const pid of readdirSync("/proc")) {
    if (!/^[0-9]+$/.test(pid)) continue;
    let stat;
    try { stat = readFileSync(`/proc/${pid}/stat`, "utf8"); } catch { continue; }
    const open = stat.indexOf("("), close = stat.lastIndexOf(")");
    if (stat.slice(open + 1, close) !== "postgres") continue;
    // Fields after "pid (comm) ": state ppid pgrp session tty tpgid flags minflt cminflt majflt
    // cmajflt utime stime cutime cstime ...
    const f = stat.slice(close + 2).split(" ");
    ticks += Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]);
  }
  return (ticks * 1000) / CLK_TCK;
}

function percentile(sorted, p) {
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

const silentLogger = () => () => {};

async function workerMain(args) {
  let completed = 0;
  let last = 0;
  let expect = Infinity;
  let cpu0 = null;
  const maybeDone = () => {
    if (completed >= expect) {
      process.send({ type: "done", completed, last, cpuMs: cpuMs(process.cpuUsage(cpu0)) });
      expect = Infinity;
    }
  };
  const runner = await run({
    connectionString: args.url,
    concurrency: args.concurrency,
    maxPoolSize: args.concurrency + 1,
    noHandleSignals: true,
    pollInterval: 2000,
    logger: new Logger(silentLogger),
    taskList: {
      noop: async () => {
        completed++;
        last = now();
        if (completed >= expect) setImmediate(maybeDone);
      },
    },
    preset: {
      worker: {
        localQueue: args.localQueue > 1 ? { size: args.localQueue } : undefined,
        completeJobBatchDelay: 0,
        failJobBatchDelay: 0,
      },
    },
  });
  process.on("message", async (m) => {
    if (m.type === "start") {
      cpu0 = process.cpuUsage();
      completed = 0;
      process.send({ type: "started" });
    } else if (m.type === "expect") {
      expect = m.n;
      maybeDone();
    } else if (m.type === "stop") {
      await runner.stop();
      process.exit(0);
    }
  });
  process.on("disconnect", () => process.exit(1));
  process.send({ type: "ready" });
}

function waitFor(child, type) {
  return new Promise((resolve, reject) => {
    const onMsg = (m) => { if (m.type === type) { cleanup(); resolve(m); } };
    const onExit = (code) => { cleanup(); reject(new Error(`worker exited (${code}) while waiting for ${type}`)); };
    const cleanup = () => { child.off("message", onMsg); child.off("exit", onExit); };
    child.on("message", onMsg);
    child.on("exit", onExit);
  });
}

async function main(args) {
  const version = JSON.parse(readFileSync(new URL("./node_modules/graphile-worker/package.json", import.meta.url), "utf8")).version;

  await runMigrations({ connectionString: args.url, logger: new Logger(silentLogger) });
  const child = fork(fileURLToPath(import.meta.url), [...process.argv.slice(2), "--worker"], { stdio: ["ignore", "inherit", "inherit", "ipc"] });
  const killChild = () => { try { child.kill("SIGKILL"); } catch {} };
  process.on("exit", killChild);
  await waitFor(child, "ready");

  const pool = new pg.Pool({ connectionString: args.url, max: args.clientPool });
  pool.on("error", () => {});
  pool.on("connect", (c) => c.on("error", () => {}));
  const utils = await makeWorkerUtils({ pgPool: pool, logger: new Logger(silentLogger) });
  // Open every pool connection (and prepare the statement) before the clock starts, as wrk
  // connects before sending.
  const warm = await Promise.all(Array.from({ length: args.clientPool }, () => pool.connect()));
  warm.forEach((c) => c.release());
  // One warm-up job, completed before the measurement.
  const warmDone = waitFor(child, "done");
  await utils.addJob("noop", { warmup: true });
  child.send({ type: "expect", n: 1 });
  await warmDone;

  const started = waitFor(child, "started");
  child.send({ type: "start" });
  await started;
  const pg0 = postgresCpuMs();
  const self0 = process.cpuUsage();
  const lat = [];
  let issued = 0;
  const t0 = now();
  const deadline = args.duration > 0 ? t0 + args.duration : Infinity;
  const client = async (id) => {
    for (let seq = 0; ; seq++) {
      if (args.jobs > 0) { if (issued >= args.jobs) return; issued++; }
      else if (now() >= deadline) return;
      const s = now();
      await utils.addJob("noop", { client: id, seq });
      lat.push(now() - s);
    }
  };
  await Promise.all(Array.from({ length: args.clients }, (_, i) => client(i)));
  const tEnqueued = now();
  const selfCpu = cpuMs(process.cpuUsage(self0));
  const doneP = waitFor(child, "done");
  child.send({ type: "expect", n: lat.length });
  // A stuck worker (its log is silenced) must not hang the benchmark.
  const done = await Promise.race([
    doneP,
    new Promise((_, reject) => setTimeout(() => reject(new Error("jobs not all completed within 300 s")), 300000).unref()),
  ]);
  // Completions are committed in batches just after the task bodies return: the last completion
  // is when the queue is seen empty, if that is later than the last task body.
  const left = async () => (await pool.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs")).rows[0].n;
  let last = done.last;
  if ((await left()) !== 0) {
    for (;;) {
      await new Promise((r) => setTimeout(r, 5));
      const t = now();
      if ((await left()) === 0) { last = t; break; }
    }
  }
  const pgCpu = postgresCpuMs() - pg0;
  child.send({ type: "stop" });
  await new Promise((r) => child.once("exit", r));
  await utils.release();
  await pool.end();

  lat.sort((a, b) => a - b);
  const jobs = lat.length;
  const seconds = (last - t0) / 1000;
  const r2 = (x) => Math.round(x * 100) / 100;
  console.log(JSON.stringify({
    system: "graphile-worker",
    version,
    jobs,
    completed: done.completed,
    commit_lag_ms: Math.round((last - done.last) * 10) / 10,
    seconds: Math.round(seconds * 1000) / 1000,
    jobs_per_s: Math.round(jobs / seconds),
    enqueue_seconds: Math.round(tEnqueued - t0) / 1000,
    enqueue_p50_ms: r2(percentile(lat, 50)),
    enqueue_p99_ms: r2(percentile(lat, 99)),
    clients: args.clients,
    client_pool: args.clientPool,
    concurrency: args.concurrency,
    local_queue: args.localQueue > 1 ? args.localQueue : 0,
    cpu_worker_ms: Math.round(done.cpuMs),
    cpu_client_ms: Math.round(selfCpu),
    cpu_pg_ms: Math.round(pgCpu),
    // Worker + PostgreSQL, the counterpart of sluice's nodes + PostgreSQL (the client process, like
    // wrk, is the load generator and is reported apart).
    cpu_ms_per_job: Math.round(((done.cpuMs + pgCpu) / jobs) * 1000) / 1000,
    node: process.version,
  }));
}

const args = parseArgs(process.argv);
(args.worker ? workerMain(args) : main(args)).catch((e) => {
  console.error(e);
  process.exit(1);
});
