//! Identifiers and secrets: invocation ids, API keys and their hashes, blob digests.

use sha2::{Digest, Sha256};

/// A new invocation id: a UUIDv7, so ids sort by creation time.
pub fn invocation_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// A new opaque id for keys and similar records.
pub fn short_id(prefix: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &u[..16])
}

/// The hex SHA-256 digest of `bytes`: the address of a blob.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The prefix every sluice API key starts with, so that leaked keys are easy to scan for.
pub const KEY_PREFIX: &str = "sk_";

/// Builds an API key from 32 bytes of secret randomness. Keys carry 256 bits of entropy, so a
/// single SHA-256 is a sufficient one-way hash (a slow password hash adds nothing for random keys
/// and would cost milliseconds on every request).
pub fn api_key_from_secret(secret: &[u8; 32]) -> String {
    format!("{KEY_PREFIX}{}", hex::encode(secret))
}

/// The stored form of an API key.
pub fn hash_api_key(key: &str) -> String {
    sha256_hex(key.as_bytes())
}

/// Whether a tenant or function name is acceptable: 1–63 characters of `[a-z0-9-]`, starting with
/// a letter or digit. Names appear in URLs, so they are kept to what needs no escaping.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("hello"));
        assert!(valid_name("a-1"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("Hello"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"a".repeat(64)));
    }

    #[test]
    fn ids_are_unique_and_keys_hash_stably() {
        assert_ne!(invocation_id(), invocation_id());
        assert_eq!(invocation_id().len(), 32);
        let key = api_key_from_secret(&[7; 32]);
        assert_eq!(key, format!("sk_{}", "07".repeat(32)));
        // A known answer, computed outside this code (`printf %s KEY | sha256sum`): every stored
        // key is this hash, so a change here would lock out every key in every store.
        assert_eq!(hash_api_key(&key), "596f2bbe9cabf8b2cb17ecfba119389dd87f8bb67c9ffa292baf8608cfb330d7");
    }
}
