//! Aliases: a name for one or more versions of a function, with a weight each. The vocabulary the
//! store, the gateway and the CLI share.

/// The alias a deploy moves (unless `deploy --no-promote`), and the one `/fn/{t}/{f}/` calls.
pub const LATEST: &str = "latest";

/// Versions one alias may route to at once: a canary is two, an A/B/C test three; more is a
/// mistake that would only make the per-call choice longer.
pub const ROUTES_MAX: usize = 8;

/// Aliases one function may have at most (`latest` included). Each is a row in the store and in
/// every node's registry, and each keeps the versions it names from retention: without a bound a
/// stolen deploy key could make a node's memory grow with every `alias set`.
pub const ALIASES_MAX: usize = 32;

/// The sum of an alias's weights at most: weights are shares (`3=90 4=10`), and a bound keeps
/// their sum far from overflow in the per-call choice.
pub const WEIGHT_TOTAL_MAX: u32 = 1_000_000;

/// One version an alias routes to, and its weight (its share is weight / sum of weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    pub version: i64,
    pub weight: u32,
}

/// Whether `name` may name an alias: a lowercase name like a function's that starts with a letter,
/// so that `f@3` always means version 3 and never an alias.
pub fn valid_name(name: &str) -> bool {
    crate::ids::valid_name(name) && name.starts_with(|c: char| c.is_ascii_lowercase())
}

/// Checks the routes of an alias: 1 to [`ROUTES_MAX`] distinct versions (each ≥ 1) with positive
/// weights summing to at most [`WEIGHT_TOTAL_MAX`]. The error says what to change.
pub fn check_routes(routes: &[Route]) -> Result<(), String> {
    if routes.is_empty() || routes.len() > ROUTES_MAX {
        return Err(format!("an alias names 1 to {ROUTES_MAX} versions, got {}", routes.len()));
    }
    let mut total: u64 = 0;
    for (i, r) in routes.iter().enumerate() {
        if r.version < 1 {
            return Err(format!("version {} does not exist: versions are numbered from 1", r.version));
        }
        if r.weight == 0 {
            return Err(format!("version {} has weight 0: leave it out instead", r.version));
        }
        if routes[..i].iter().any(|o| o.version == r.version) {
            return Err(format!("version {} is named twice", r.version));
        }
        total += u64::from(r.weight);
    }
    if total > u64::from(WEIGHT_TOTAL_MAX) {
        return Err(format!("the weights sum to {total}, more than {WEIGHT_TOTAL_MAX}"));
    }
    Ok(())
}

/// Parses the CLI's route list: `3` (all calls to version 3) or `3=90 4=10` (weights).
pub fn parse_routes(words: &[String]) -> Result<Vec<Route>, String> {
    let routes = words
        .iter()
        .map(|w| {
            let (version, weight) = match w.split_once('=') {
                Some((v, w)) => (v, w.trim_end_matches('%')),
                None if words.len() == 1 => (w.as_str(), "100"),
                None => return Err(format!("{w:?}: give each version its weight, as VERSION=WEIGHT")),
            };
            let version =
                version.parse().map_err(|_| format!("{w:?}: {version:?} is not a version number"))?;
            let weight = weight.parse().map_err(|_| format!("{w:?}: {weight:?} is not a whole weight"))?;
            Ok(Route { version, weight })
        })
        .collect::<Result<Vec<_>, String>>()?;
    check_routes(&routes)?;
    Ok(routes)
}

/// A 64-bit FNV-1a hash: stable across builds and platforms (unlike std's `DefaultHasher`), so a
/// `sluice-routing-key` picks the same version on every node and after every upgrade.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short keys that differ in their last byte; a final avalanche
    // (splitmix64's) spreads every input bit over the bits `% total` reads.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn route_lists_parse_and_are_checked() {
        assert_eq!(parse_routes(&words("3")).unwrap(), vec![Route { version: 3, weight: 100 }]);
        assert_eq!(
            parse_routes(&words("3=90 4=10%")).unwrap(),
            vec![Route { version: 3, weight: 90 }, Route { version: 4, weight: 10 }]
        );
        assert!(parse_routes(&words("3 4")).unwrap_err().contains("VERSION=WEIGHT"));
        assert!(parse_routes(&words("3=90 3=10")).unwrap_err().contains("named twice"));
        assert!(parse_routes(&words("3=0 4=10")).unwrap_err().contains("weight 0"));
        assert!(parse_routes(&words("0")).unwrap_err().contains("numbered from 1"));
        assert!(parse_routes(&words("x=1")).unwrap_err().contains("not a version"));
        assert!(parse_routes(&[]).unwrap_err().contains("1 to 8"));
        assert!(parse_routes(&words("1=1000000 2=1")).unwrap_err().contains("more than"));
    }

    #[test]
    fn alias_names_start_with_a_letter() {
        assert!(valid_name("prod"));
        assert!(valid_name("canary-2"));
        assert!(!valid_name("3"));
        assert!(!valid_name("3a"));
        assert!(!valid_name("Prod"));
    }

    #[test]
    fn the_stable_hash_is_stable_and_spreads_short_keys() {
        // Pinned: a change would move every routing key's user to another version.
        assert_eq!(stable_hash(b""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(stable_hash(b"user-1"), 0xc499_b5f8_a721_df58);
        let mut buckets = [0u32; 10];
        for i in 0..10_000 {
            buckets[(stable_hash(format!("user-{i}").as_bytes()) % 10) as usize] += 1;
        }
        // 1000 expected per bucket; a standard deviation is 30.
        assert!(buckets.iter().all(|&n| (850..1150).contains(&n)), "{buckets:?}");
    }
}
