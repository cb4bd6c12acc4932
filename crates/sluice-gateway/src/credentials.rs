//! What a guest must never see: the platform's credentials. A sluice API key is recognised by its
//! prefix ([`KEY_PREFIX`]) wherever it sits in `Authorization` (`Bearer sk_…`, `Basic` with the
//! key as user or password, any other scheme), so a key sent to a public function — as
//! `sluice invoke` always does — is dropped like one sent to a private function.
//!
//! This module only decides and removes; who authenticates a call is `invoke`'s business.

use http::{HeaderMap, HeaderValue, header};
use sluice_core::ids::KEY_PREFIX;

/// Removes the platform's credentials from the headers of a request bound for a guest (run now or
/// stored for later).
///
/// - `Proxy-Authorization` always: it is addressed to the hop, never to the origin.
/// - For a private function, `Authorization` always: it carried the platform's key.
/// - For a public function, only `Authorization` values that carry a sluice key; any other value
///   reaches the guest, which may do its own authentication.
pub fn strip_platform_credentials(headers: &mut HeaderMap, public: bool) {
    headers.remove(header::PROXY_AUTHORIZATION);
    if !public {
        headers.remove(header::AUTHORIZATION);
        return;
    }
    if !headers.get_all(header::AUTHORIZATION).iter().any(carries_sluice_key) {
        return;
    }
    let kept: Vec<HeaderValue> =
        headers.get_all(header::AUTHORIZATION).iter().filter(|v| !carries_sluice_key(v)).cloned().collect();
    headers.remove(header::AUTHORIZATION);
    for v in kept {
        headers.append(header::AUTHORIZATION, v);
    }
}

/// Whether a credentials value carries a sluice key: in clear (any scheme, or none), or inside
/// `Basic`'s base64 `user:password`.
fn carries_sluice_key(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    if contains_key(bytes) {
        return true;
    }
    bytes.split(|b| b.is_ascii_whitespace()).filter(|t| !t.is_empty()).any(|t| {
        // Any token may be base64 (`Basic` and look-alike custom schemes); decoding a token that
        // is not is harmless: it finds no key.
        base64_decode(t).is_some_and(|decoded| contains_key(&decoded))
    })
}

/// Whether `bytes` holds [`KEY_PREFIX`] at the start of a word (start, or after a byte that is
/// not alphanumeric), so `desk_…` is not mistaken for a key.
fn contains_key(bytes: &[u8]) -> bool {
    let prefix = KEY_PREFIX.as_bytes();
    bytes
        .windows(prefix.len())
        .enumerate()
        .any(|(i, w)| w.eq_ignore_ascii_case(prefix) && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric()))
}

/// Standard or URL-safe base64, padding optional; `None` for anything else.
fn base64_decode(token: &[u8]) -> Option<Vec<u8>> {
    let token = token.strip_suffix(b"==").or_else(|| token.strip_suffix(b"=")).unwrap_or(token);
    let mut out = Vec::with_capacity(token.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in token {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn authorization(h: &HeaderMap) -> Vec<&str> {
        h.get_all(header::AUTHORIZATION).iter().map(|v| v.to_str().unwrap()).collect()
    }

    #[test]
    fn a_sluice_key_never_reaches_a_public_function() {
        // "user:KEY" and "KEY:" in base64, as a Basic client would send them.
        let basic_password = format!("Basic {}", encode(format!("user:{KEY}").as_bytes()));
        let basic_user = format!("basic {}", encode(format!("{KEY}:").as_bytes()));
        for value in [
            format!("Bearer {KEY}"),
            format!("bearer   {KEY}"),
            KEY.to_string(),
            format!("Token token={KEY}"),
            KEY.to_uppercase(),
            basic_password,
            basic_user,
        ] {
            let mut h = headers(&[("authorization", &value), ("x-other", "1")]);
            strip_platform_credentials(&mut h, true);
            assert!(authorization(&h).is_empty(), "{value} reached the guest");
            assert!(h.contains_key("x-other"));
        }
    }

    #[test]
    fn other_credentials_reach_a_public_function_but_not_a_private_one() {
        let basic = format!("Basic {}", encode(b"alice:secret"));
        for value in ["Bearer not-a-sluice-key", "Bearer desk_123", basic.as_str()] {
            let mut h = headers(&[("authorization", value)]);
            strip_platform_credentials(&mut h, true);
            assert_eq!(authorization(&h), [value]);
            strip_platform_credentials(&mut h, false);
            assert!(authorization(&h).is_empty());
        }
        // Of several values, only the sluice key goes.
        let mut h = headers(&[("authorization", "Bearer mine"), ("authorization", &format!("Bearer {KEY}"))]);
        strip_platform_credentials(&mut h, true);
        assert_eq!(authorization(&h), ["Bearer mine"]);
    }

    #[test]
    fn proxy_authorization_never_reaches_a_guest() {
        for public in [true, false] {
            let mut h = headers(&[("proxy-authorization", "Basic Zm9vOmJhcg==")]);
            strip_platform_credentials(&mut h, public);
            assert!(h.is_empty());
        }
    }

    #[test]
    fn base64_round_trips() {
        for s in [&b""[..], b"a", b"ab", b"abc", b"user:sk_x", &[0xff, 0x00, 0xfe]] {
            assert_eq!(base64_decode(encode(s).as_bytes()).unwrap(), s);
        }
        assert_eq!(base64_decode(b"not base64!"), None);
    }

    /// Standard base64 with padding, independent of the decoder under test.
    fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
