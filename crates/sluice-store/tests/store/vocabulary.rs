//! The vocabulary in the database: every column that holds a word of `sluice_core::vocab` accepts
//! each word of its enum and refuses anything else (the CHECK constraints of SQLite migration 11
//! and PostgreSQL migration 5; the rollouts' of 13 and 7), on both stores, so the SQL and the
//! enums cannot drift apart. And SQLite's rebuild of the tables for those constraints keeps every
//! row, index and the log counter.

use std::path::Path;

use sluice_core::{Catchup, Criticality, InvocationStatus, LogStream, Mode, Overlap, RolloutStatus};
use sluice_store::{PostgresStore, SqliteStore};
use sqlx::{AssertSqlSafe, Connection};

use crate::postgres::TempDatabase;

/// The migrations that add the constraints, by store.
const SQLITE_MIGRATION: (i64, &str) =
    (11, include_str!("../../migrations/sqlite/0011_vocabulary_checks.sql"));
const POSTGRES_MIGRATION: (i64, &str) =
    (5, include_str!("../../migrations/postgres/0005_vocabulary_checks.sql"));

/// A raw connection beside the store, to write what the store's own code never would.
enum Raw {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Raw {
    async fn execute(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            Self::Sqlite(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
            Self::Postgres(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
        }
    }

    async fn fetch_i64(&mut self, sql: &str) -> i64 {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            Self::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await,
            Self::Postgres(c) => sqlx::query_scalar(sql).fetch_one(c).await,
        }
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Fails unless the store applied the constraints' migration when it opened.
    async fn assert_applied(&mut self, (version, _): (i64, &str)) {
        let applied =
            self.fetch_i64(&format!("SELECT COUNT(*) FROM schema_version WHERE version = {version}")).await;
        assert_eq!(applied, 1, "the store did not apply migration {version}");
    }
}

fn quoted(word: &str) -> String {
    format!("'{word}'")
}

/// One column of the vocabulary: the values its enum has, and values that are not words of it.
struct Column {
    table: &'static str,
    name: &'static str,
    accepted: Vec<String>,
    refused: Vec<String>,
}

fn columns() -> Vec<Column> {
    let words = |words: &[&str]| words.iter().map(|w| quoted(w)).collect();
    vec![
        Column {
            table: "invocations",
            name: "status",
            accepted: words(&InvocationStatus::WORDS),
            refused: words(&["finished", "Queued", ""]),
        },
        Column {
            table: "invocations",
            name: "mode",
            accepted: words(&Mode::WORDS),
            refused: words(&["later", "ASYNC"]),
        },
        Column {
            table: "invocations",
            name: "criticality",
            // The store keeps a criticality as its position in the enum.
            accepted: Criticality::ALL.iter().map(|c| (*c as i64).to_string()).collect(),
            refused: vec!["-1".into(), Criticality::ALL.len().to_string()],
        },
        Column {
            table: "log_lines",
            name: "stream",
            accepted: words(&LogStream::WORDS),
            refused: words(&["stdlog", "system "]),
        },
        // SQLite migration 13 and PostgreSQL 7.
        Column {
            table: "rollouts",
            name: "status",
            accepted: words(&RolloutStatus::WORDS),
            refused: words(&["rolled back", "Running", ""]),
        },
        // SQLite migration 14 and PostgreSQL 8.
        Column {
            table: "schedules",
            name: "overlap",
            accepted: words(&Overlap::WORDS),
            refused: words(&["buffer_one", "Skip", ""]),
        },
        Column {
            table: "schedules",
            name: "catchup",
            accepted: words(&Catchup::WORDS),
            refused: words(&["most-recent", "ALL", ""]),
        },
    ]
}

/// A row of `table` with `column` set to `value`, every other column valid.
fn insert(table: &str, column: &str, value: &str, n: usize) -> String {
    let mut invocation = [
        ("id", format!("'inv-{n}'")),
        ("tenant", quoted("acme")),
        ("function", quoted("hello")),
        ("version", "1".into()),
        ("mode", quoted(Mode::Async.as_str())),
        ("status", quoted(InvocationStatus::Queued.as_str())),
        ("attempts", "0".into()),
        ("created_at", "0".into()),
        ("criticality", (Criticality::Normal as i64).to_string()),
    ];
    let mut line = [
        ("invocation_id", quoted("inv-base")),
        ("tenant", quoted("acme")),
        ("function", quoted("hello")),
        ("stream", quoted(LogStream::Stdout.as_str())),
        ("line", quoted("hi")),
        ("at", "0".into()),
    ];
    let mut rollout = [
        ("id", n.to_string()),
        ("tenant", quoted("acme")),
        ("function", quoted("hello")),
        ("alias", quoted("latest")),
        ("stable_version", "1".into()),
        ("canary_version", "2".into()),
        ("steps", quoted("100")),
        ("step", "0".into()),
        ("every_ms", "1000".into()),
        ("margin_bp", "100".into()),
        ("min_calls", "20".into()),
        ("status", quoted(RolloutStatus::Promoted.as_str())),
        ("created_at", "0".into()),
        ("updated_at", "0".into()),
    ];
    let mut schedule = [
        ("id", n.to_string()),
        ("tenant", quoted("acme")),
        ("name", format!("'s-{n}'")),
        ("function", quoted("hello")),
        ("alias", quoted("latest")),
        ("every_ms", "1000".into()),
        ("overlap", quoted(Overlap::Skip.as_str())),
        ("catchup", quoted(Catchup::Latest.as_str())),
        ("request_headers", quoted("[]")),
        ("created_at", "0".into()),
        ("updated_at", "0".into()),
    ];
    let row: &mut [(&str, String)] = match table {
        "invocations" => &mut invocation,
        "rollouts" => &mut rollout,
        "schedules" => &mut schedule,
        _ => &mut line,
    };
    row.iter_mut().find(|(name, _)| *name == column).expect("a column of the row").1 = value.to_string();
    let names: Vec<&str> = row.iter().map(|(name, _)| *name).collect();
    let values: Vec<&str> = row.iter().map(|(_, value)| value.as_str()).collect();
    format!("INSERT INTO {table} ({}) VALUES ({})", names.join(", "), values.join(", "))
}

async fn every_word_and_nothing_else(raw: &mut Raw) {
    raw.execute(&insert("invocations", "id", "'inv-base'", 0)).await.expect("the base invocation");
    // The function a rollout row names.
    raw.execute("INSERT INTO tenants (name, created_at) VALUES ('acme', 0)").await.expect("a tenant");
    raw.execute("INSERT INTO functions (tenant, name, created_at, updated_at, latest_version) VALUES ('acme', 'hello', 0, 0, 2)")
        .await
        .expect("a function");
    let mut n = 0;
    for column in columns() {
        for value in &column.accepted {
            n += 1;
            let sql = insert(column.table, column.name, value, n);
            raw.execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{}.{} = {value} refused: {e}", column.table, column.name));
        }
        for value in &column.refused {
            n += 1;
            let sql = insert(column.table, column.name, value, n);
            let refused = raw
                .execute(&sql)
                .await
                .expect_err(&format!("{}.{} = {value} accepted", column.table, column.name));
            let check = refused.as_database_error().is_some_and(|e| e.is_check_violation());
            assert!(check, "{}.{} = {value}: {refused}", column.table, column.name);
        }
    }
}

#[tokio::test]
async fn sqlite_columns_hold_every_word_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let mut raw = Raw::Sqlite(sqlite(&path).await);
    raw.assert_applied(SQLITE_MIGRATION).await;
    every_word_and_nothing_else(&mut raw).await;
    store.close().await;
}

#[tokio::test]
async fn postgres_columns_hold_every_word_and_nothing_else() {
    let Some(database) = TempDatabase::create().await else { return };
    let store = PostgresStore::connect(&database.url).await.unwrap();
    let mut raw = Raw::Postgres(sqlx::PgConnection::connect(&database.url).await.unwrap());
    raw.assert_applied(POSTGRES_MIGRATION).await;
    every_word_and_nothing_else(&mut raw).await;
    store.close().await;
}

async fn sqlite(path: &Path) -> sqlx::SqliteConnection {
    // Foreign keys on, as the store has them: the rebuild must work with them on.
    let options =
        sqlx::sqlite::SqliteConnectOptions::new().filename(path).create_if_missing(true).foreign_keys(true);
    sqlx::SqliteConnection::connect_with(&options).await.unwrap()
}

/// Every row of `table`, each column quoted, in `seq`/`id` order: two tables with the same text
/// hold the same values in the same columns.
async fn table_text(c: &mut sqlx::SqliteConnection, table: &str) -> String {
    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?) ORDER BY cid")
        .bind(table)
        .fetch_all(&mut *c)
        .await
        .unwrap();
    let row = columns.iter().map(|c| format!("quote({c})")).collect::<Vec<_>>().join(" || ',' || ");
    let sql = format!(
        "SELECT '{}' || char(10) || COALESCE(group_concat({row}, char(10)), '') FROM (SELECT * FROM {table} ORDER BY 1)",
        columns.join(",")
    );
    sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&mut *c).await.unwrap()
}

/// What the rebuild must keep: rows, columns, indexes and the log counter.
async fn schema_and_data(c: &mut sqlx::SqliteConnection) -> Vec<String> {
    let mut kept = Vec::new();
    for table in ["invocations", "log_lines", "responses"] {
        kept.push(table_text(c, table).await);
    }
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
    )
    .fetch_all(&mut *c)
    .await
    .unwrap();
    kept.extend(indexes.into_iter().map(|(name, sql)| format!("{name}: {sql}")));
    let counter: i64 = sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'log_lines'")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    kept.push(format!("log_lines counter {counter}"));
    kept
}

/// Migration 11 rebuilds `invocations`, `log_lines` and `responses` on a database that has rows
/// in them: nothing is lost, the cascade from an invocation to its lines still works, and a new
/// line gets a `seq` above every one handed out before (even one whose line was deleted).
#[tokio::test]
async fn sqlite_rebuild_keeps_rows_indexes_and_the_log_counter() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = sqlite(&dir.path().join("sluice.db")).await;
    // The schema just before migration 11, from the migration files themselves.
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    let mut files: Vec<_> = std::fs::read_dir(&folder).unwrap().map(|f| f.unwrap().path()).collect();
    files.sort();
    for file in files.iter().take_while(|f| !f.ends_with("0011_vocabulary_checks.sql")) {
        let sql = std::fs::read_to_string(file).unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!("BEGIN;\n{sql}\nCOMMIT;"))).execute(&mut c).await.unwrap();
    }
    sqlx::raw_sql(
        "INSERT INTO invocations (id, tenant, function, version, mode, status, attempts, created_at,
             started_at, finished_at, status_code, cpu_us)
         VALUES ('sync-1', 'acme', 'hello', 1, 'sync', 'succeeded', 1, 10, 11, 12, 200, 35);
         INSERT INTO invocations (id, tenant, function, version, mode, status, attempts, created_at,
             request_method, request_path, request_headers, request_body, criticality, run_after,
             deadline, attempts_max, max_age_ms, max_age_at, idempotency_key, waits, request_bytes)
         VALUES ('async-1', 'acme', 'hello', 2, 'async', 'failed', 1, 20, 'POST', '/x',
             '[[\"a\",\"62\"]]', x'00ff', 0, 25, 90, 3, 1000, 1020, 'k1', '{\"quota_ms\":3}', 12);
         INSERT INTO invocations (id, tenant, function, version, mode, status, attempts, created_at,
             attempts_max, lease_owner, lease_expires_at)
         VALUES ('async-2', 'acme', 'hello', 2, 'async', 'running', 1, 30, 3, 'node-a', 40);
         INSERT INTO responses VALUES ('sync-1', 200, '[]', x'6869');
         INSERT INTO log_lines (invocation_id, tenant, function, stream, line, at) VALUES
             ('sync-1', 'acme', 'hello', 'stdout', 'one', 11),
             ('sync-1', 'acme', 'hello', 'stderr', 'two', 11),
             ('async-1', 'acme', 'hello', 'system', 'three', 21),
             ('async-1', 'acme', 'hello', 'stdout', 'four', 21);
         DELETE FROM log_lines WHERE line = 'four';",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let before = schema_and_data(&mut c).await;
    assert!(before.last().unwrap().ends_with(" 4"), "the counter is ahead of the rows: {before:?}");

    sqlx::raw_sql(AssertSqlSafe(format!("BEGIN;\n{}\nCOMMIT;", SQLITE_MIGRATION.1)))
        .execute(&mut c)
        .await
        .unwrap();

    let after = schema_and_data(&mut c).await;
    assert_eq!(before, after);
    let problems: Vec<(String, Option<i64>, String, i64)> =
        sqlx::query_as("PRAGMA foreign_key_check").fetch_all(&mut c).await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let leftovers: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_schema WHERE name LIKE '%_v11'")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(leftovers, 0);
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO log_lines (invocation_id, tenant, function, stream, line, at)
         VALUES ('async-1', 'acme', 'hello', 'stdout', 'five', 22) RETURNING seq",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(seq, 5, "a seq is never handed out twice");
    sqlx::raw_sql("DELETE FROM invocations WHERE id = 'sync-1'").execute(&mut c).await.unwrap();
    let orphans: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM log_lines WHERE invocation_id = 'sync-1')
              + (SELECT COUNT(*) FROM responses WHERE invocation_id = 'sync-1')",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "deleting an invocation still deletes its lines and response");
}
