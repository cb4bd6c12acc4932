//! The product's vocabulary, defined once: invocation states and modes, criticalities, key
//! scopes and log streams, each with its `ALL` list. The HTTP schema, the CLI and the store all
//! read them from here; the store's CHECK constraints are tested against these lists (the store's
//! `vocabulary` test), so the database and the enums cannot drift apart.
//!
//! Each word has one spelling, [`as_str`](InvocationStatus::as_str), used on the wire, in the
//! database and in messages; `FromStr` refuses anything else with an [`UnknownWord`] that lists
//! the words it knows.

use std::fmt;

/// A word that is not one of its vocabulary's: says what it should have been.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownWord {
    /// What the word was meant to name ("status", "scope").
    pub what: &'static str,
    pub word: String,
    pub expected: &'static [&'static str],
}

impl fmt::Display for UnknownWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} {:?}: use {}", self.what, self.word, listed(self.expected.iter().copied()))
    }
}

impl std::error::Error for UnknownWord {}

/// `a`, `a or b`, `a, b or c`: words for a message.
pub fn listed<'a>(words: impl IntoIterator<Item = &'a str>) -> String {
    let words: Vec<&str> = words.into_iter().collect();
    match words.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// Defines a closed vocabulary: the enum, its `ALL` list and `WORDS` (in the same order),
/// `as_str`, `parse`, `FromStr`, `Display` and serde as the word itself.
macro_rules! vocabulary {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $( $(#[$variant_meta:meta])* $variant:ident = $word:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$variant_meta])* $variant, )+
        }

        impl $name {
            pub const ALL: [Self; [$($word),+].len()] = [$(Self::$variant),+];
            /// The words of [`Self::ALL`], in its order.
            pub const WORDS: [&'static str; [$($word),+].len()] = [$($word),+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $word, )+
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $( $word => Some(Self::$variant), )+
                    _ => None,
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownWord;

            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                Self::parse(s).ok_or_else(|| UnknownWord { what: $what, word: s.to_string(), expected: &Self::WORDS })
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let word = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                word.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

vocabulary! {
    /// The state of an invocation (DESIGN.md section 3): `queued → running → succeeded |
    /// failed (retrying) → dead`, plus `expired`.
    pub enum InvocationStatus ("status") {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        /// Failed an attempt, waiting for its retry.
        Failed = "failed",
        Dead = "dead",
        /// Not started before its deadline.
        Expired = "expired",
    }
}

impl InvocationStatus {
    /// Nothing will change any more (until a re-drive of a dead or expired call).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Dead | Self::Expired)
    }

    /// Ended without a success: the attempt failed, or the call is dead or expired.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Failed | Self::Dead | Self::Expired)
    }
}

vocabulary! {
    /// Where an automatic rollout is: `running`, then one of the three ends.
    pub enum RolloutStatus ("rollout status") {
        /// Moving the alias's weight to the canary, one step at a time.
        Running = "running",
        /// The last step passed: the alias names only the canary.
        Promoted = "promoted",
        /// A step's canary error rate exceeded the stable version's plus the margin: the alias
        /// names only the stable version again.
        RolledBack = "rolled_back",
        /// Stopped by `rollout cancel`, a manual alias move or a deploy that moved the alias.
        Cancelled = "cancelled",
    }
}

vocabulary! {
    /// How a call was made: answered on its connection, or queued (`Prefer: respond-async`).
    pub enum Mode ("mode") {
        Sync = "sync",
        Async = "async",
    }
}

vocabulary! {
    /// How urgently a queued invocation should run; leased in this order (high first). The
    /// store keeps it as its position in [`Self::ALL`] (0 high, 1 normal, 2 low).
    #[derive(PartialOrd, Ord)]
    pub enum Criticality ("criticality") {
        High = "high",
        Normal = "normal",
        Low = "low",
    }
}

vocabulary! {
    /// What an API key may do. `Admin` may do everything in every tenant; the others are granted
    /// per tenant.
    #[derive(PartialOrd, Ord)]
    pub enum Scope ("scope") {
        Admin = "admin",
        Deploy = "deploy",
        Invoke = "invoke",
        Read = "read",
        /// Scrape `/metrics`: the key's own tenant's series.
        Metrics = "metrics",
    }
}

impl Scope {
    /// The scopes a tenant's key may carry (admin keys belong to no tenant).
    pub const TENANT: [Self; 4] = [Self::Deploy, Self::Invoke, Self::Read, Self::Metrics];
}

vocabulary! {
    /// What a schedule does when an occurrence is due while the invocation of the previous one
    /// has not finished (Temporal's overlap policies, on the queue).
    pub enum Overlap ("overlap policy") {
        /// Does not enqueue it: the occurrence is counted as skipped.
        Skip = "skip",
        /// Keeps it (at most one), and enqueues it once the previous invocation finished.
        BufferOne = "buffer-one",
        /// Enqueues it at once, whatever runs.
        Allow = "allow",
    }
}

vocabulary! {
    /// What a schedule does with occurrences it missed (no node ran for a while): of the
    /// occurrences due at once, all but the most recent were missed, and the most recent too
    /// once it is more than `serve --schedule-missed-after` late (see
    /// [`catch_up`](crate::schedule::catch_up)). A paused schedule misses nothing: it resumes
    /// from its next occurrence after the resume.
    pub enum Catchup ("catch-up policy") {
        /// Enqueues only the most recent occurrence, however late.
        Latest = "latest",
        /// Enqueues every missed occurrence, the most recent
        /// [`CATCHUP_ALL_MAX`](crate::schedule::CATCHUP_ALL_MAX) at most.
        All = "all",
        /// Enqueues none of them: only an occurrence on time fires.
        None = "none",
    }
}

vocabulary! {
    /// Which stream a guest log line came from.
    pub enum LogStream ("log stream") {
        Stdout = "stdout",
        Stderr = "stderr",
        /// A line sluice adds about the invocation (e.g. the trap message, a denied outbound call).
        System = "system",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T>(all: &[T], words: &[&str])
    where
        T: Copy + PartialEq + fmt::Debug + fmt::Display + std::str::FromStr + serde::Serialize,
        T: serde::de::DeserializeOwned,
    {
        assert_eq!(all.len(), words.len());
        for (value, word) in all.iter().zip(words) {
            assert_eq!(value.to_string(), *word);
            assert_eq!(word.parse::<T>().ok(), Some(*value));
            let json = serde_json::to_string(value).unwrap();
            assert_eq!(json, format!("\"{word}\""));
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), *value);
        }
        assert!("".parse::<T>().is_err());
        assert!(serde_json::from_str::<T>("\"nonsense\"").is_err());
    }

    #[test]
    fn every_word_round_trips() {
        round_trips(&InvocationStatus::ALL, &InvocationStatus::WORDS);
        round_trips(&Mode::ALL, &Mode::WORDS);
        round_trips(&Criticality::ALL, &Criticality::WORDS);
        round_trips(&Scope::ALL, &Scope::WORDS);
        round_trips(&LogStream::ALL, &LogStream::WORDS);
        round_trips(&Overlap::ALL, &Overlap::WORDS);
        round_trips(&Catchup::ALL, &Catchup::WORDS);
        assert!(Criticality::High < Criticality::Low, "leased in this order");
        assert_eq!(Criticality::ALL.map(|c| c as i64), [0, 1, 2], "the store keeps these numbers");
    }

    #[test]
    fn an_unknown_word_lists_the_known_ones() {
        let err = "root".parse::<Scope>().unwrap_err();
        assert_eq!(err.to_string(), r#"unknown scope "root": use admin, deploy, invoke, read or metrics"#);
        let err = serde_json::from_str::<Mode>("\"later\"").unwrap_err();
        assert!(err.to_string().contains(r#"unknown mode "later": use sync or async"#), "{err}");
        assert_eq!(listed(["a"]), "a");
        assert_eq!(listed(Scope::TENANT.map(Scope::as_str)), "deploy, invoke, read or metrics");
    }
}
