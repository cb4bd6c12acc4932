//! Secret environment variables of a function version. Their values go to the store and into the
//! guest's environment, and nowhere else: no API response, CLI output, log line or error message.
//!
//! [`Secrets`] makes that hard to get wrong: it has no `Serialize` (a response type that embeds it
//! does not compile), its `Debug` shows names only, and the values are reached only through
//! [`Secrets::expose`], whose callers are the store and the runtime.

use std::fmt;

/// Named secret values, in the order they were given.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(Vec<(String, String)>);

impl Secrets {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Self(pairs)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names, which may be shown anywhere.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }

    /// The names and values, for the store and the guest's environment only.
    pub fn expose(&self) -> &[(String, String)] {
        &self.0
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.names().map(|n| (n, "<redacted>"))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_names_not_values() {
        let s = Secrets::new(vec![("API_TOKEN".into(), "hunter2".into())]);
        let shown = format!("{s:?}");
        assert!(shown.contains("API_TOKEN") && !shown.contains("hunter2"), "{shown}");
        assert_eq!(s.names().collect::<Vec<_>>(), ["API_TOKEN"]);
    }
}
