//! The store's promises, as one integration binary.
//!
//! `suite` holds backend-independent tests: async functions over `&dyn Store` that any backend
//! must pass. Each backend module (`sqlite`, `postgres`) runs every suite function against
//! a fresh database, plus the few tests that only make sense for that backend. `vocabulary`
//! holds the database's CHECK constraints to `sluice_core::vocab` on both.

mod postgres;
mod sqlite;
mod suite;
mod vocabulary;
