//! What the queue's writer and the shared statements need to know of a database, below the
//! [`Engine`](crate::sql::Engine) that adds the statements and routes particular to each: its sqlx
//! driver, how its errors and results read, and how rows become tuples.

use sqlx::{Database, Encode, IntoArguments, Type};

use crate::rows::{Column, StoreRow};
use crate::{StoreError, StoreResult};

/// One database's driver, and the one place its errors are classified.
pub trait Dialect: Clone + std::fmt::Debug + Send + Sync + 'static {
    type DB: Database<Row: StoreRow, Arguments: IntoArguments<Self::DB>>;

    /// The one place this database's errors are classified.
    fn classify(error: sqlx::Error) -> StoreError;
    fn rows_affected(done: &<Self::DB as Database>::QueryResult) -> u64;
}

/// A connection of the dialect's database.
pub(crate) type Conn<E> = <<E as Dialect>::DB as Database>::Connection;

/// A value the shared statements bind, on either database. The shared code's bounds (repeated on
/// each domain's `impl`, since Rust does not imply them) are: a connection executes statements,
/// and `&str`, `Option<&str>`, `i64`, `Option<i64>`, `f64` and `bool` bind.
pub trait Bind<DB: Database>: for<'q> Encode<'q, DB> + Type<DB> + Send {}

impl<DB: Database, T: for<'q> Encode<'q, DB> + Type<DB> + Send> Bind<DB> for T {}

/// Reads rows as tuples by position, from either database.
pub(crate) trait Tuple<R>: Sized {
    fn from_row(row: &R) -> StoreResult<Self>;
}

macro_rules! tuples {
    ($(($($t:ident $i:tt),*))*) => {$(
        impl<R: $(Column<$t> +)*, $($t),*> Tuple<R> for ($($t,)*) {
            fn from_row(row: &R) -> StoreResult<Self> {
                Ok(($(Column::<$t>::column_at(row, $i)?,)*))
            }
        }
    )*};
}

tuples! {
    (A 0)
    (A 0, B 1)
    (A 0, B 1, C 2)
    (A 0, B 1, C 2, D 3)
    (A 0, B 1, C 2, D 3, F 4)
    (A 0, B 1, C 2, D 3, F 4, G 5)
    (A 0, B 1, C 2, D 3, F 4, G 5, H 6)
}

pub(crate) fn tuples<R: StoreRow, T: Tuple<R>>(rows: Vec<R>) -> StoreResult<Vec<T>> {
    rows.iter().map(T::from_row).collect()
}
