//! Parsing of the human units used on the command line and in the API: `128MiB`, `30s`.

use std::time::Duration;

/// Parses a byte size such as `128MiB`, `64 KiB`, `1GB` or a plain number of bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid size {s:?}: {e} (examples: 128MiB, 64KiB, 1048576)"))
}

/// Bytes as a person reads them: `1.4 MiB`.
pub fn format_bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

/// Parses a duration such as `30s`, `250ms`, `15min`, `6h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?}: {e} (examples: 30s, 250ms, 15min)"))
}

/// Formats a duration in the same human units, e.g. `30s`.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("128MiB"), Ok(128 << 20));
        assert_eq!(parse_bytes("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("lots").is_err());
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
    }
}
