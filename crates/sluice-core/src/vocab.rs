//! The product's vocabulary, defined once: invocation states, criticalities and key scopes, each
//! with its `ALL` list. The HTTP schema, the CLI and the store all read them from here.

use serde::{Deserialize, Serialize};

/// The state of an invocation (DESIGN.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvocationStatus {
    Queued,
    Running,
    Succeeded,
    /// Failed an attempt, waiting for its retry.
    Failed,
    Dead,
    Expired,
}

impl InvocationStatus {
    pub const ALL: [Self; 6] =
        [Self::Queued, Self::Running, Self::Succeeded, Self::Failed, Self::Dead, Self::Expired];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Dead | Self::Expired)
    }
}

/// How urgently a queued invocation should run; leased in this order (high first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Criticality {
    High = 0,
    Normal = 1,
    Low = 2,
}

impl Criticality {
    pub const ALL: [Self; 3] = [Self::High, Self::Normal, Self::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// What an API key may do. `Admin` may do everything in every tenant; the others are granted per
/// tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Admin,
    Deploy,
    Invoke,
    Read,
    /// Scrape `/metrics`: the key's own tenant's series.
    Metrics,
}

impl Scope {
    pub const ALL: [Self; 5] = [Self::Admin, Self::Deploy, Self::Invoke, Self::Read, Self::Metrics];
    /// The scopes a tenant's key may carry (admin keys belong to no tenant).
    pub const TENANT: [Self; 4] = [Self::Deploy, Self::Invoke, Self::Read, Self::Metrics];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Deploy => "deploy",
            Self::Invoke => "invoke",
            Self::Read => "read",
            Self::Metrics => "metrics",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|sc| sc.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_round_trips() {
        for st in InvocationStatus::ALL {
            assert_eq!(InvocationStatus::parse(st.as_str()), Some(st));
        }
        for c in Criticality::ALL {
            assert_eq!(Criticality::parse(c.as_str()), Some(c));
        }
        for sc in Scope::ALL {
            assert_eq!(Scope::parse(sc.as_str()), Some(sc));
        }
        assert!(Criticality::High < Criticality::Low, "leased in this order");
    }
}
