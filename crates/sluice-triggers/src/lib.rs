//! sluice-triggers: broker messages into durable async invocations.
//!
//! Every node runs one [`run`] task. Every `TRIGGER_LEASE_RENEW` it renews the leases of the
//! triggers it consumes and takes a few free ones (`Triggers::claim_triggers`), starts a
//! consumer for each trigger it newly holds and stops the consumers of those it no longer holds
//! (lost, paused, deleted or changed). So in a cluster each trigger has one consumer at a time,
//! whatever the broker offers, and a dead node's triggers move after the lease (10 s).
//!
//! A consumer (`runner::batches`) takes a batch from its broker (`--batch` messages, waiting at most
//! `--window` after the first), turns each message into an invocation in CloudEvents HTTP binary
//! mode (body unchanged; `ce-id` from the trigger and the message's broker position, also the
//! invocation's idempotency key), reserves the tenant's queued quota for each (a refused one and
//! those after it go back to the broker, to come again later), and commits the batch in one
//! transaction fenced by its lease. Only after that commit is the broker acked: a crash between
//! the two gives a redelivery, whose key is held already, and nothing is stored twice. A batch
//! its node could not commit is not acked either.
//!
//! The adapters: [`nats`] (JetStream durable pull consumer), [`amqp`] (AMQP 0-9-1 with manual
//! acks), [`mqtt`] (MQTT 3.1.1, persistent session, QoS 1, manual acks). A broker of another
//! kind (Kafka) is a new [`Broker`]; ARCHITECTURE.md has the design.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod broker;
pub mod mqtt;
pub mod nats;
pub mod runner;

pub use broker::{Broker, Message};
pub use runner::{EVENTS, TAKE_PER_RENEWAL, TRIGGER_HEADER, release_all, run};
