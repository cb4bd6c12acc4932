//! Guest log lines, of one invocation or tailed by function ([`Logs`]).

use sluice_core::{LogStream, UnixMs};
use sqlx::Executor;

use crate::StoreResult;
use crate::rows::{log_line_from_row, rows};
use crate::sql::{Bind, Conn, Engine, SqlStore};

/// A guest log line. `seq` orders lines of one function across invocations (for `logs -f`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub seq: i64,
    pub invocation_id: String,
    pub stream: LogStream,
    pub line: String,
    pub at: UnixMs,
}

/// Most log lines one `function_logs` call returns, whatever `limit` the caller asks for.
pub const FUNCTION_LOGS_LIMIT_MAX: u32 = 10_000;

store_trait! {
    /// Log lines.
    pub trait Logs {
        async fn invocation_logs(&self, id: &str) -> StoreResult<Vec<LogLine>>;
        /// Log lines of a function with `seq > after_seq`, oldest first, at most `limit`. With
        /// `after_seq = None` the *last* `limit` lines are returned (still oldest first).
        async fn function_logs(
            &self,
            tenant: &str,
            function: &str,
            after_seq: Option<i64>,
            limit: u32,
        ) -> StoreResult<Vec<LogLine>>;
    }
}

#[async_trait::async_trait]
impl<E: Engine> Logs for SqlStore<E>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    async fn invocation_logs(&self, id: &str) -> StoreResult<Vec<LogLine>> {
        let found = sqlx::query(
            "SELECT seq, invocation_id, stream, line, at FROM log_lines
             WHERE invocation_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        rows(found, log_line_from_row)
    }

    async fn function_logs(
        &self,
        tenant: &str,
        function: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<LogLine>> {
        let limit = i64::from(limit.min(FUNCTION_LOGS_LIMIT_MAX));
        let found = match after_seq {
            Some(after_seq) => {
                sqlx::query(
                    "SELECT seq, invocation_id, stream, line, at FROM log_lines
                     WHERE tenant = $1 AND function = $2 AND seq > $3
                     ORDER BY seq LIMIT $4",
                )
                .bind(tenant)
                .bind(function)
                .bind(after_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
            // The newest `limit` lines, walked backwards on the index, then put oldest first.
            None => {
                sqlx::query(
                    "SELECT seq, invocation_id, stream, line, at FROM (
                         SELECT seq, invocation_id, stream, line, at FROM log_lines
                         WHERE tenant = $1 AND function = $2
                         ORDER BY seq DESC LIMIT $3
                     ) AS newest ORDER BY seq",
                )
                .bind(tenant)
                .bind(function)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(E::classify)?;
        rows(found, log_line_from_row)
    }
}
