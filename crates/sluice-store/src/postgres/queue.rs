//! The SQL of [`PostgresStore`](super::PostgresStore)'s async queue.
//!
//! Enqueues, completions, heartbeats, releases, re-drives and purges go through the shared writer
//! ([`crate::queue`]) on one connection per node, in group-committed batches. Leases do not: each
//! is its own short statement on the pool (`FOR UPDATE SKIP LOCKED`, so nodes leasing at once take
//! different rows), preceded by bounded sweeps of expired deadlines, old rows and lost leases,
//! each its own statement too (see [`lease`]).
//!
//! Two things SQLite's single writer got for free are explicit here:
//! - Every fencing condition (status, owner, attempt) is on the row being updated, never only on a
//!   row read beside it, so that PostgreSQL re-checks it on the newest version of a row another
//!   node changed meanwhile.
//! - Log lines of one function are inserted under an advisory lock held to the commit, so within a
//!   function `seq` follows commit order (see `INSERT_LOGS`).
//!
//! Statements read their ops from JSON arrays with `jsonb_to_record`, in array order
//! (`WITH ORDINALITY`).

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use super::{PostgresEngine, classify};
use crate::queue::{Backend, Done, LeaseOp, Op, Statements, held_head, key_idle, ordered_keys_after};
use crate::rows::leased_from_row;
use crate::{LeaseClass, Leased, StoreResult};

/// The writer's own connection. With `db_clock` every "now" of a queue write is the database's
/// ([`crate::ClockSource::Database`]); otherwise the caller's.
pub(super) struct Postgres {
    pub(super) options: PgConnectOptions,
    pub(super) db_clock: bool,
}

impl Postgres {
    /// The caller's `now`, or `None` where the statement must take the database's.
    fn now(&self, caller: i64) -> Option<i64> {
        (!self.db_clock).then_some(caller)
    }
}

/// `$1` of every statement that reads enqueue rows.
macro_rules! enqueue_rows {
    () => {
        "jsonb_array_elements($1::jsonb) WITH ORDINALITY AS j(value, ord)
         CROSS JOIN LATERAL jsonb_to_record(j.value) AS r(
             id text, tenant text, function text, version bigint, method text, path text,
             headers jsonb, body text, criticality bigint, run_after bigint, deadline bigint,
             attempts_max bigint, max_age_ms bigint, max_age_at bigint, idempotency_key text,
             caller text, body_sha256 text, created_at bigint, request_bytes bigint,
             order_key text, order_seq bigint)"
    };
}

pub(super) const CLAIM_KEYS: &str = concat!(
    "INSERT INTO idempotency_keys (tenant, function, caller, idempotency_key, invocation_id,
             created_at, request_method, request_path, body_sha256)
         SELECT r.tenant, r.function, r.caller, r.idempotency_key, r.id, r.created_at, r.method,
                r.path, r.body_sha256
         FROM ",
    enqueue_rows!(),
    "
         WHERE r.idempotency_key IS NOT NULL
         ORDER BY j.ord
         ON CONFLICT (tenant, function, caller, idempotency_key) DO UPDATE
             SET invocation_id = excluded.invocation_id, created_at = excluded.created_at,
                 request_method = excluded.request_method, request_path = excluded.request_path,
                 body_sha256 = excluded.body_sha256
             WHERE idempotency_keys.created_at <= excluded.created_at - $2"
);

/// Inserts the rows without a key and those that won theirs, and tells idle nodes there is work
/// (delivered at the commit, once per transaction) in the same round trip. Returns the count.
pub(super) const INSERT_QUEUED: &str = concat!(
    "WITH inserted AS (
             INSERT INTO invocations (id, tenant, function, version, mode, status, attempts,
                 created_at, request_method, request_path, request_headers, request_body,
                 criticality, run_after, deadline, attempts_max, max_age_ms, max_age_at,
                 idempotency_key, request_bytes, order_key, order_seq)
             SELECT r.id, r.tenant, r.function, r.version, 'async', 'queued', 0, r.created_at,
                    r.method, r.path, r.headers::text, decode(r.body, 'hex'), r.criticality,
                    r.run_after, r.deadline, r.attempts_max, r.max_age_ms, r.max_age_at,
                    r.idempotency_key, r.request_bytes, r.order_key, r.order_seq
             FROM ",
    enqueue_rows!(),
    "
             WHERE r.idempotency_key IS NULL
                OR EXISTS (
                    SELECT 1 FROM idempotency_keys AS k
                    WHERE k.tenant = r.tenant AND k.function = r.function AND k.caller = r.caller
                      AND k.idempotency_key = r.idempotency_key AND k.invocation_id = r.id)
             ORDER BY j.ord
             RETURNING 1),
         counted AS (SELECT count(*) AS n FROM inserted)
         SELECT counted.n FROM counted
         LEFT JOIN LATERAL (SELECT pg_notify($2, '') WHERE counted.n > 0) AS announced ON true"
);

const KEY_HOLDERS: &str = concat!(
    "SELECT j.ord - 1 AS position, k.invocation_id, k.request_method, k.request_path, k.body_sha256
         FROM ",
    enqueue_rows!(),
    "
         JOIN idempotency_keys AS k
           ON k.tenant = r.tenant AND k.function = r.function AND k.caller = r.caller
          AND k.idempotency_key = r.idempotency_key"
);

/// The state change of each completion whose lease still holds. The fencing conditions and the
/// next status read the updated row itself (`i`), so they are evaluated on its newest version.
const COMPLETE_FENCED: &str = "
    WITH c AS (
        SELECT r.*, CASE WHEN $2 THEN sluice_now_ms() ELSE r.now END AS at
        FROM jsonb_array_elements($1::jsonb) AS j(value)
        CROSS JOIN LATERAL jsonb_to_record(j.value) AS r(
            id text, owner text, attempt bigint, succeeded boolean, status_code bigint,
            error_kind text, retry_at bigint, cpu_us bigint, now bigint))
    UPDATE invocations AS i SET
        status = CASE
            WHEN c.succeeded THEN 'succeeded'
            WHEN c.retry_at IS NOT NULL AND i.attempts < i.attempts_max AND c.retry_at <= i.max_age_at
                THEN 'failed'
            ELSE 'dead' END,
        status_code = c.status_code,
        error_kind = c.error_kind,
        run_after = CASE
            WHEN NOT c.succeeded AND c.retry_at IS NOT NULL AND i.attempts < i.attempts_max
                 AND c.retry_at <= i.max_age_at THEN c.retry_at
            ELSE i.run_after END,
        finished_at = CASE
            WHEN NOT c.succeeded AND c.retry_at IS NOT NULL AND i.attempts < i.attempts_max
                 AND c.retry_at <= i.max_age_at THEN NULL
            ELSE c.at END,
        cpu_us = COALESCE(i.cpu_us, 0) + c.cpu_us,
        lease_owner = NULL,
        lease_expires_at = NULL
    FROM c
    WHERE i.id = c.id AND i.status = 'running' AND i.lease_owner = c.owner AND i.attempts = c.attempt
    RETURNING i.id, i.order_key";

const UPSERT_RESPONSES: &str = "
    INSERT INTO responses (invocation_id, status, headers, body)
    SELECT r.invocation_id, r.status, r.headers::text, decode(r.body, 'hex')
    FROM jsonb_array_elements($1::jsonb) AS j(value)
    CROSS JOIN LATERAL jsonb_to_record(j.value) AS r(invocation_id text, status bigint, headers jsonb, body text)
    ON CONFLICT (invocation_id) DO UPDATE
        SET status = excluded.status, headers = excluded.headers, body = excluded.body";

const DELETE_RESPONSES: &str = "
    DELETE FROM responses
    WHERE invocation_id IN (SELECT jsonb_array_elements_text($1::jsonb))";

/// Takes, in a fixed order (so two batches cannot deadlock on them), the advisory lock of every
/// function whose lines follow, held until the commit: the log inserts of one function then
/// commit in `seq` order, so a tail reading `seq > n` never misses a line that commits later with
/// a smaller `seq`. Functions differ in their locks, so only writers of the same function wait.
const LOCK_LOG_FUNCTIONS: &str = "
    SELECT count(pg_advisory_xact_lock(f.key)) FROM (
        SELECT DISTINCT hashtextextended(i.tenant || '/' || i.function, 0) AS key
        FROM jsonb_array_elements($1::jsonb) AS j(value)
        JOIN invocations AS i ON i.id = j.value ->> 'invocation_id'
        ORDER BY key) AS f";

const INSERT_LOGS: &str = "
    INSERT INTO log_lines (invocation_id, tenant, function, stream, line, at)
    SELECT i.id, i.tenant, i.function, r.stream, r.line, r.at
    FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS j(value, ord)
    CROSS JOIN LATERAL jsonb_to_record(j.value) AS r(invocation_id text, stream text, line text, at bigint)
    JOIN invocations AS i ON i.id = r.invocation_id
    ORDER BY j.ord";

// --- in order per key (see the SQLite store's statements) ---

/// Releases, for each key of a JSON array (`$1`) of objects with an `order_key` that has nothing
/// in flight, its first held invocation: runnable from `$2` (NULL: the database's clock). Two
/// nodes may race here (one enqueues behind a head that the other completes); what the race
/// leaves held, [`crate::queue::release_orphaned_heads`] releases at a later sweep.
pub(super) const RELEASE_HEADS: &str = concat!(
    "UPDATE invocations AS i SET run_after = (SELECT COALESCE($2::bigint, sluice_now_ms()))
     FROM (SELECT ",
    held_head!(),
    " AS id
           FROM (SELECT DISTINCT r.order_key AS key
                 FROM jsonb_array_elements($1::jsonb) AS j(value)
                 CROSS JOIN LATERAL jsonb_to_record(j.value) AS r(order_key text)
                 WHERE r.order_key IS NOT NULL) AS k
           WHERE ",
    key_idle!(),
    ") AS head
     WHERE i.id = head.id AND i.run_after = 9223372036854775807 AND i.status IN ('queued', 'failed')"
);

/// Keys for [`crate::queue::release_orphaned_heads`]: `$2` at most, after `$1`.
pub(super) const ORDERED_KEYS_AFTER: &str = ordered_keys_after!("$1::text", "$2");

#[async_trait::async_trait]
impl Backend for Postgres {
    type Engine = PostgresEngine;

    const BEGIN: &'static str = "BEGIN";
    const CLAIM_KEYS: &'static str = CLAIM_KEYS;
    const KEY_HOLDERS: &'static str = KEY_HOLDERS;
    const UPSERT_RESPONSES: &'static str = UPSERT_RESPONSES;
    const DELETE_RESPONSES: &'static str = DELETE_RESPONSES;
    const RELEASE: &'static str = RELEASE;
    const HEARTBEAT: &'static str = HEARTBEAT;
    const RETRY_DEAD: &'static str = RETRY_DEAD;
    const RECORD_WAITS: &'static str = RECORD_WAITS;
    const PURGE_FINISHED: &'static str = PURGE_FINISHED;
    const PURGE_KEYS: &'static str = PURGE_KEYS;
    const RELEASE_HEADS: &'static str = RELEASE_HEADS;

    async fn connect(&self) -> StoreResult<PgConnection> {
        self.options.connect().await.map_err(classify)
    }

    fn now(&self, caller: i64) -> Option<i64> {
        (!self.db_clock).then_some(caller)
    }

    /// One statement either way: `jsonb_to_record` costs nothing for the keys a row lacks.
    async fn insert_queued(
        &self,
        connection: &mut PgConnection,
        rows: &str,
        _ordered: bool,
    ) -> StoreResult<u64> {
        let inserted: i64 = sqlx::query_scalar(INSERT_QUEUED)
            .bind(rows)
            .bind(super::QUEUE_CHANNEL)
            .fetch_one(&mut *connection)
            .await
            .map_err(classify)?;
        Ok(u64::try_from(inserted).unwrap_or(0))
    }

    async fn complete_fenced(
        &self,
        connection: &mut PgConnection,
        rows: &str,
    ) -> StoreResult<Vec<(String, Option<String>)>> {
        sqlx::query_as(COMPLETE_FENCED)
            .bind(rows)
            .bind(self.db_clock)
            .fetch_all(&mut *connection)
            .await
            .map_err(classify)
    }

    async fn insert_logs(&self, connection: &mut PgConnection, rows: &str) -> StoreResult<()> {
        self.statement(connection, LOCK_LOG_FUNCTIONS, rows).await?;
        self.statement(connection, INSERT_LOGS, rows).await.map(drop)
    }

    /// Given back or re-driven: the other nodes hear of it at once, not at their next poll.
    async fn announce(&self, connection: &mut PgConnection) -> StoreResult<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(super::QUEUE_CHANNEL)
            .execute(&mut *connection)
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// Leases run on the pool (see the module documentation); one through the writer is served
    /// all the same.
    async fn apply_own(&self, connection: &mut PgConnection, op: &Op) -> StoreResult<Done> {
        match op {
            Op::Lease(op) => {
                sweep(connection, self.now(op.now)).await?;
                Ok(Done::Leased(lease(connection, op, self.now(op.now)).await?))
            }
            _ => unreachable!("PostgreSQL writes sync records, blobs and node heartbeats from its pool"),
        }
    }
}

// --- lease ---

macro_rules! now {
    () => {
        "(SELECT COALESCE($1::bigint, sluice_now_ms()))"
    };
}

/// "Now" in every statement below: the caller's (`$1`), or the database's when that is NULL. A
/// scalar subquery, so that it is computed once per statement (an init plan) and can bound an
/// index scan: `sluice_now_ms()` itself is volatile, and a volatile call in a condition would be
/// evaluated per row and turn every sweep into a scan of the table.
const NOW: &str = now!();

/// Each sweep changes at most `$2` rows that no one else holds locked, and repeats its conditions
/// on the updated row, so a row another node changed meanwhile is judged on its newest version.
const SWEEPS: [&str; 3] = [
    // Pending rows whose start window closed before they started.
    concat!(
        "UPDATE invocations SET status = 'expired', finished_at = ",
        now!(),
        ", error_kind = 'expired'
             WHERE id IN (SELECT id FROM invocations
                          WHERE status IN ('queued', 'failed') AND deadline < ",
        now!(),
        "
                          LIMIT $2 FOR UPDATE SKIP LOCKED)
               AND status IN ('queued', 'failed') AND deadline < ",
        now!()
    ),
    // Pending rows that grew too old to start.
    concat!(
        "UPDATE invocations SET status = 'dead', finished_at = ",
        now!(),
        ", error_kind = 'max_age'
             WHERE id IN (SELECT id FROM invocations
                          WHERE status IN ('queued', 'failed') AND max_age_at < ",
        now!(),
        "
                          LIMIT $2 FOR UPDATE SKIP LOCKED)
               AND status IN ('queued', 'failed') AND max_age_at < ",
        now!()
    ),
    // Running rows whose lease expired (see the SQLite store's RECLAIM_EXPIRED_LEASES).
    concat!(
        "UPDATE invocations SET
                 status = CASE
                     WHEN deadline < ",
        now!(),
        " THEN 'expired'
                     WHEN max_age_at < ",
        now!(),
        " OR attempts >= attempts_max THEN 'dead'
                     ELSE 'failed' END,
                 error_kind = CASE
                     WHEN deadline < ",
        now!(),
        " THEN 'expired'
                     WHEN max_age_at < ",
        now!(),
        " THEN 'max_age'
                     WHEN attempts >= attempts_max THEN COALESCE(error_kind, 'lease_lost')
                     ELSE 'lease_lost' END,
                 finished_at = CASE
                     WHEN deadline < ",
        now!(),
        " OR max_age_at < ",
        now!(),
        " OR attempts >= attempts_max THEN ",
        now!(),
        "
                     ELSE NULL END,
                 lease_owner = NULL,
                 lease_expires_at = NULL
             WHERE id IN (SELECT id FROM invocations
                          WHERE status = 'running' AND lease_expires_at < ",
        now!(),
        "
                          LIMIT $2 FOR UPDATE SKIP LOCKED)
               AND status = 'running' AND lease_expires_at < ",
        now!()
    ),
];

/// The lease: walks `invocations_runnable` in its order, skipping rows another node is leasing
/// right now, and takes at most `$4`. Rows past their deadline or max age are not leased even
/// when no sweep has marked them yet (sweeps run at most every [`super::SWEEP_INTERVAL`]): that
/// check is on the update, not the walk, so that no condition tempts the planner away from the
/// index whose order is the lease's (with a table's statistics lagging behind a fast-growing
/// queue, `max_age_at >= now` once made it pick `invocations_pending_age` and sort 80,000 rows
/// per lease).
const LEASE: &str = concat!(
    "WITH picked AS (
             SELECT id FROM invocations
             WHERE status IN ('queued', 'failed') AND run_after <= ",
    now!(),
    "
             ORDER BY criticality, COALESCE(deadline, 9223372036854775807), run_after, id
             LIMIT $4
             FOR UPDATE SKIP LOCKED)
         UPDATE invocations AS i SET
             status = 'running',
             attempts = i.attempts + 1,
             lease_owner = $2,
             lease_expires_at = ",
    now!(),
    " + $3,
             started_at = COALESCE(i.started_at, ",
    now!(),
    "),
             waits = '{\"queued_ms\":' || GREATEST(",
    now!(),
    " - i.run_after, 0)::text || '}'
         FROM picked
         WHERE i.id = picked.id AND (i.deadline IS NULL OR i.deadline >= ",
    now!(),
    ") AND i.max_age_at >= ",
    now!(),
    "
         RETURNING i.id, i.tenant, i.function, i.version, i.request_method, i.request_path,
                   i.request_headers, i.request_body, i.attempts, i.attempts_max, i.created_at,
                   i.max_age_at, i.criticality, i.deadline, i.run_after"
);

/// One of the scheduler's asks ([`crate::LeaseAsk`]): $1 now or NULL, $2 owner, $3 lease_ms,
/// $4 promote_ahead_ms, $5 tenant, $6 function or NULL, $7 excluded functions (a JSON array),
/// $8 limit. Like [`LEASE`], the walk's conditions are only what its index can answer.
fn lease_ask_sql(class: LeaseClass) -> String {
    let (class, order) = match class {
        LeaseClass::Due => ("deadline IS NOT NULL AND deadline <= {NOW} + $4", "deadline, run_after, id"),
        LeaseClass::Plain => ("deadline IS NULL", "criticality, run_after, id"),
        LeaseClass::Deferrable => {
            ("deadline IS NOT NULL AND deadline > {NOW} + $4", "criticality, deadline, run_after, id")
        }
    };
    let class = class.replace("{NOW}", NOW);
    format!(
        "WITH picked AS (
             SELECT id FROM invocations
             WHERE status IN ('queued', 'failed') AND {class}
               AND tenant = $5 AND run_after <= {NOW} AND ($6::text IS NULL OR function = $6)
               AND NOT (function = ANY (SELECT jsonb_array_elements_text($7::jsonb)))
             ORDER BY {order}
             LIMIT $8
             FOR UPDATE SKIP LOCKED)
         UPDATE invocations AS i SET
             status = 'running',
             attempts = i.attempts + 1,
             lease_owner = $2,
             lease_expires_at = {NOW} + $3,
             started_at = COALESCE(i.started_at, {NOW}),
             waits = '{{\"queued_ms\":' || GREATEST({NOW} - i.run_after, 0)::text || '}}'
         FROM picked
         WHERE i.id = picked.id AND (i.deadline IS NULL OR i.deadline >= {NOW}) AND i.max_age_at >= {NOW}
         RETURNING i.id, i.tenant, i.function, i.version, i.request_method, i.request_path,
                   i.request_headers, i.request_body, i.attempts, i.attempts_max, i.created_at,
                   i.max_age_at, i.criticality, i.deadline, i.run_after"
    )
}

/// The statements of the three classes, built once.
fn lease_ask_statement(class: LeaseClass) -> &'static str {
    static SQL: std::sync::OnceLock<[String; 3]> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| LeaseClass::ALL.map(lease_ask_sql));
    let at = LeaseClass::ALL.iter().position(|c| *c == class).expect("every class is in ALL");
    &all[at]
}

/// Fenced by attempt: a later attempt keeps its own reasons.
const RECORD_WAITS: &str = "
    UPDATE invocations AS i SET waits = w.waits
    FROM jsonb_to_recordset($1::jsonb) AS w(id text, attempt bigint, waits text)
    WHERE i.id = w.id AND i.attempts = w.attempt";

/// Marks what expired, grew too old or lost its lease: each sweep bounded, each its own
/// transaction. `now` is `None` to use the database's clock.
/// And, at most every [`ORPHANED_HEADS_INTERVAL`] in this process, releases the held heads of
/// keys whose predecessor a sweep ended or a race between nodes left behind
/// ([`crate::queue::release_orphaned_heads`], a bounded walk resumed where the last one ended).
pub(super) async fn sweep(connection: &mut PgConnection, now: Option<i64>) -> StoreResult<()> {
    for statement in SWEEPS {
        sqlx::query(statement)
            .bind(now)
            .bind(super::SWEEP_BATCH_MAX)
            .execute(&mut *connection)
            .await
            .map_err(classify)?;
    }
    // With the caller's clock (tests with a fake one), every sweep.
    if let Some(cursor) = orphaned_heads_due(now.is_some()) {
        let next = crate::queue::release_orphaned_heads::<PostgresEngine>(
            connection,
            ORDERED_KEYS_AFTER,
            RELEASE_HEADS,
            &cursor,
            crate::queue::ORDERED_KEYS_PER_RUN,
            now,
        )
        .await?;
        ORPHANS.lock().expect("orphaned heads lock").1 = next;
    }
    Ok(())
}

/// How often a sweep also releases orphaned heads, at most.
pub const ORPHANED_HEADS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// When this process last released orphaned heads, and the key its next run starts after.
static ORPHANS: std::sync::Mutex<(Option<std::time::Instant>, String)> =
    std::sync::Mutex::new((None, String::new()));

/// The key to start after, if a run is due (`always`: every sweep).
fn orphaned_heads_due(always: bool) -> Option<String> {
    let mut orphans = ORPHANS.lock().expect("orphaned heads lock");
    let due = always || orphans.0.is_none_or(|at| at.elapsed() >= ORPHANED_HEADS_INTERVAL);
    due.then(|| {
        orphans.0 = Some(std::time::Instant::now());
        orphans.1.clone()
    })
}

/// Leases (see [`LEASE`]). `now` is `None` to use the database's clock.
pub(super) async fn lease(
    connection: &mut PgConnection,
    op: &LeaseOp,
    now: Option<i64>,
) -> StoreResult<Vec<Leased>> {
    let Some(_) = &op.asks else {
        let found = sqlx::query(LEASE)
            .bind(now)
            .bind(&op.owner)
            .bind(op.lease_ms)
            .bind(op.limit)
            .fetch_all(&mut *connection)
            .await
            .map_err(classify)?;
        return in_lease_order(&found);
    };
    Ok(lease_asks(connection, op, now).await?.into_iter().flatten().collect())
}

/// Leases the op's asks; what each leased, in their order.
pub(super) async fn lease_asks(
    connection: &mut PgConnection,
    op: &LeaseOp,
    now: Option<i64>,
) -> StoreResult<Vec<Vec<Leased>>> {
    let mut leased = Vec::new();
    for (ask, excluded) in op.asks.iter().flatten() {
        if ask.limit == 0 {
            leased.push(Vec::new());
            continue;
        }
        let found = sqlx::query(sqlx::AssertSqlSafe(lease_ask_statement(ask.class)))
            .bind(now)
            .bind(&op.owner)
            .bind(op.lease_ms)
            .bind(op.promote_ahead_ms)
            .bind(&ask.tenant)
            .bind(ask.function.as_deref())
            .bind(excluded.as_str())
            .bind(i64::from(ask.limit))
            .fetch_all(&mut *connection)
            .await
            .map_err(classify)?;
        leased.push(in_lease_order(&found)?);
    }
    Ok(leased)
}

/// RETURNING yields rows in no promised order: sorts them back into lease order.
fn in_lease_order(found: &[sqlx::postgres::PgRow]) -> StoreResult<Vec<Leased>> {
    let mut leased = found.iter().map(leased_from_row).collect::<StoreResult<Vec<_>>>()?;
    leased.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(leased.into_iter().map(|(_, l)| l).collect())
}

// --- heartbeat, release, retry_dead, purge ---

const HEARTBEAT: &str = concat!(
    "UPDATE invocations AS i SET lease_expires_at = GREATEST(i.lease_expires_at, ",
    now!(),
    " + $4)
     FROM jsonb_to_recordset($3::jsonb) AS l(id text, attempt bigint)
     WHERE i.id = l.id AND i.attempts = l.attempt AND i.status = 'running' AND i.lease_owner = $2
     RETURNING i.id, i.attempts"
);

const RELEASE: &str = "
    UPDATE invocations AS i SET
        status = 'queued',
        attempts = i.attempts - 1,
        started_at = CASE WHEN i.attempts = 1 THEN NULL ELSE i.started_at END,
        lease_owner = NULL,
        lease_expires_at = NULL
    FROM jsonb_to_recordset($2::jsonb) AS l(id text, attempt bigint)
    WHERE i.id = l.id AND i.attempts = l.attempt AND i.status = 'running' AND i.lease_owner = $1";

const RETRY_DEAD: &str = concat!(
    "UPDATE invocations SET
         status = 'queued',
         attempts = 0,
         run_after = ",
    now!(),
    ",
         deadline = NULL,
         max_age_at = ",
    now!(),
    " + max_age_ms,
         error_kind = NULL,
         status_code = NULL,
         started_at = NULL,
         finished_at = NULL,
         lease_owner = NULL,
         lease_expires_at = NULL
     WHERE id = $2 AND mode = 'async' AND status IN ('dead', 'expired')"
);

/// Log lines and responses go with their invocation (ON DELETE CASCADE).
const PURGE_FINISHED: &str = "
    DELETE FROM invocations WHERE id IN (
        SELECT id FROM invocations
        WHERE status IN ('succeeded', 'dead', 'expired') AND finished_at < $1
        ORDER BY finished_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED)";

const PURGE_KEYS: &str = "
    DELETE FROM idempotency_keys WHERE (tenant, function, caller, idempotency_key) IN (
        SELECT tenant, function, caller, idempotency_key FROM idempotency_keys
        WHERE created_at <= $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)";
