//! Broker triggers: where a trigger's messages come from ([`Source`]), how its credentials are
//! kept apart from what may be shown ([`Credentials`]), and the CloudEvents id that makes each
//! message's enqueue idempotent ([`event_id`]).
//!
//! A trigger turns each message of a broker into one durable async invocation of a function.
//! The runner (crate `sluice-triggers`) consumes, the store commits a batch of invocations, and
//! only then is the broker acked.

use std::fmt;

/// Most triggers one tenant may have.
pub const TRIGGERS_PER_TENANT_MAX: u64 = 100;
/// Most messages one batch commits (the `--batch` bound), and the longest window a batch waits
/// to fill.
pub const TRIGGER_BATCH_MAX: u32 = 1_000;
pub const TRIGGER_WINDOW_MS_MAX: u64 = 10_000;
/// The defaults: up to 100 messages per commit, waiting at most 20 ms for them.
pub const TRIGGER_BATCH_DEFAULT: u32 = 100;
pub const TRIGGER_WINDOW_MS_DEFAULT: u64 = 20;

/// Where a trigger's messages come from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// A JetStream stream, read by a durable pull consumer (named by the trigger's `consumer`)
    /// filtered to `subject` (wildcards allowed).
    Nats { url: String, stream: String, subject: String },
    /// An AMQP 0-9-1 queue (RabbitMQ), consumed with manual acks.
    Amqp { url: String, queue: String },
    /// An MQTT topic filter, subscribed with a persistent session (client id: the trigger's
    /// `consumer`, clean session off) at QoS 1 with manual acks.
    Mqtt { url: String, topic: String, qos: u8 },
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Nats { .. } => "nats",
            Source::Amqp { .. } => "amqp",
            Source::Mqtt { .. } => "mqtt",
        }
    }

    pub fn url(&self) -> &str {
        match self {
            Source::Nats { url, .. } | Source::Amqp { url, .. } | Source::Mqtt { url, .. } => url,
        }
    }

    /// The broker's `host:port` (of a checked source, whose URL always has the port).
    pub fn broker_address(&self) -> &str {
        let rest = self.url().split_once("://").map_or(self.url(), |(_, rest)| rest);
        rest.split('/').next().unwrap_or(rest)
    }

    /// Whether `allowed` (the node's `serve --trigger-brokers`: `host:port` or `host` for any
    /// port, compared without case; `None`: any broker) lets this trigger connect: a tenant must
    /// not make the node a port scanner of its network.
    pub fn broker_allowed(&self, allowed: Option<&[String]>) -> bool {
        let Some(allowed) = allowed else { return true };
        let address = self.broker_address().to_ascii_lowercase();
        let host = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h);
        allowed.iter().any(|a| {
            let a = a.to_ascii_lowercase();
            a == address || a == host
        })
    }

    /// What `ce-source` says: the broker and where in it (never credentials).
    pub fn event_source(&self) -> String {
        match self {
            Source::Nats { url, stream, .. } => format!("{url}/streams/{stream}"),
            Source::Amqp { url, queue } => format!("{url}/queues/{queue}"),
            Source::Mqtt { url, topic, .. } => format!("{url}/topics/{topic}"),
        }
    }

    /// What `ce-type` says.
    pub fn event_type(&self) -> &'static str {
        match self {
            Source::Nats { .. } => "io.nats.jetstream.message",
            Source::Amqp { .. } => "org.amqp.message",
            Source::Mqtt { .. } => "org.mqtt.message",
        }
    }

    /// Checks the source, and splits credentials out of its URL: the kept URL has none.
    pub fn checked(self) -> Result<(Source, Credentials), String> {
        let (scheme_ok, default_port) = match &self {
            Source::Nats { .. } => (["nats", "tls"].as_slice(), 4222),
            Source::Amqp { .. } => (["amqp", "amqps"].as_slice(), 5672),
            Source::Mqtt { .. } => (["mqtt", "mqtts"].as_slice(), 1883),
        };
        let (url, credentials) = split_url(self.url(), scheme_ok, default_port)?;
        let name_ok = |what: &str, v: &str, max: usize| {
            if v.is_empty() || v.len() > max || v.chars().any(|c| c.is_control() || c == ' ') {
                Err(format!("{what} must be 1 to {max} visible characters without spaces, not {v:?}"))
            } else {
                Ok(())
            }
        };
        let source = match self {
            Source::Nats { stream, subject, .. } => {
                name_ok("stream", &stream, 255)?;
                if stream.contains(['.', '*', '>', '/', '\\']) {
                    return Err(format!("stream {stream:?} must not contain '.', '*', '>', '/' or '\\'"));
                }
                name_ok("subject", &subject, 255)?;
                if subject.split('.').any(str::is_empty) {
                    return Err(format!(
                        "subject {subject:?} has an empty token (\"a..b\", \".a\" or \"a.\")"
                    ));
                }
                Source::Nats { url, stream, subject }
            }
            Source::Amqp { queue, .. } => {
                name_ok("queue", &queue, 255)?;
                Source::Amqp { url, queue }
            }
            Source::Mqtt { topic, qos, .. } => {
                name_ok("topic", &topic, 1024)?;
                if qos != 1 {
                    return Err(format!(
                        "qos must be 1 (at least once, acked after the enqueue commits), not {qos}"
                    ));
                }
                Source::Mqtt { url, topic, qos }
            }
        };
        Ok((source, credentials))
    }
}

#[cfg(test)]
mod broker_tests {
    use super::*;

    #[test]
    fn brokers_are_allowed_by_host_and_port_or_by_host() {
        let nats = |url: &str| {
            Source::Nats { url: url.into(), stream: "S".into(), subject: "a.>".into() }.checked().unwrap().0
        };
        let local = nats("nats://127.0.0.1");
        assert_eq!(local.broker_address(), "127.0.0.1:4222");
        assert!(local.broker_allowed(None));
        assert!(local.broker_allowed(Some(&["127.0.0.1:4222".into()])));
        assert!(local.broker_allowed(Some(&["127.0.0.1".into()])));
        assert!(!local.broker_allowed(Some(&["127.0.0.1:4223".into(), "10.0.0.1".into()])));
        assert!(!local.broker_allowed(Some(&[])));
        let named = nats("nats://user:pw@Broker.Internal:4333/x");
        assert_eq!(named.broker_address(), "Broker.Internal:4333");
        assert!(named.broker_allowed(Some(&["broker.internal".into()])));
    }
}

/// `scheme://user:password@host:port[/path]` into the URL without credentials and them.
fn split_url(url: &str, schemes: &[&str], default_port: u16) -> Result<(String, Credentials), String> {
    let bad = || format!("url {url:?} must look like {}://host:port", schemes[0]);
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    if !schemes.contains(&scheme) {
        return Err(format!("url {url:?} must start with {}://", schemes.join(":// or ")));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) || url.len() > 2048 {
        return Err(bad());
    }
    let host = if host.contains(':') && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:{default_port}")
    };
    let credentials = match userinfo {
        None => Credentials::default(),
        Some(u) => {
            let (user, password) = u.split_once(':').unwrap_or((u, ""));
            Credentials { user: Some(user.to_string()), password: Some(password.to_string()) }
        }
    };
    Ok((format!("{scheme}://{host}{path}"), credentials))
}

/// A trigger's credentials: kept by the store and given to the broker client, never shown (no
/// `Serialize`; `Debug` redacts).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub user: Option<String>,
    pub password: Option<String>,
}

impl Credentials {
    pub fn is_empty(&self) -> bool {
        self.user.is_none()
    }

    /// The URL with these credentials put back, for the broker client only.
    pub fn apply(&self, url: &str) -> String {
        match (&self.user, url.split_once("://")) {
            (Some(user), Some((scheme, rest))) => {
                let enc = |s: &str| {
                    s.replace('%', "%25").replace('@', "%40").replace(':', "%3A").replace('/', "%2F")
                };
                format!("{scheme}://{}:{}@{rest}", enc(user), enc(self.password.as_deref().unwrap_or("")))
            }
            _ => url.to_string(),
        }
    }

    /// How the store keeps them (`user\npassword`), or `None`.
    pub fn stored(&self) -> Option<String> {
        self.user.as_ref().map(|u| format!("{u}\n{}", self.password.as_deref().unwrap_or("")))
    }

    pub fn from_stored(stored: Option<&str>) -> Self {
        match stored.and_then(|s| s.split_once('\n')) {
            Some((u, p)) => Credentials { user: Some(u.to_string()), password: Some(p.to_string()) },
            None => Credentials::default(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_empty() { "Credentials(none)" } else { "Credentials(<redacted>)" })
    }
}

/// The CloudEvents id of a message, which is also its invocation's idempotency key: the trigger
/// and the message's position in the broker, stable across redeliveries.
pub fn event_id(trigger: i64, kind: &str, position: &str) -> String {
    format!("{kind}:{trigger}:{position}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url_and_come_back_only_on_request() {
        let (source, creds) =
            Source::Amqp { url: "amqp://guest:s3cr@t@127.0.0.1/%2f".into(), queue: "q".into() }
                .checked()
                .unwrap();
        assert_eq!(source.url(), "amqp://127.0.0.1:5672/%2f");
        assert_eq!(creds.user.as_deref(), Some("guest"));
        assert_eq!(creds.password.as_deref(), Some("s3cr@t"));
        assert_eq!(creds.apply(source.url()), "amqp://guest:s3cr%40t@127.0.0.1:5672/%2f");
        assert!(!format!("{creds:?}").contains("s3cr"));
        assert_eq!(Credentials::from_stored(creds.stored().as_deref()), creds);
    }

    #[test]
    fn bad_sources_are_refused_with_the_reason() {
        let nats = |url: &str, subject: &str| {
            Source::Nats { url: url.into(), stream: "S".into(), subject: subject.into() }.checked()
        };
        assert!(nats("nats://127.0.0.1:4222", "orders.>").is_ok());
        assert!(nats("http://127.0.0.1", "a").unwrap_err().contains("nats://"));
        assert!(nats("nats://127.0.0.1", "a..b").unwrap_err().contains("empty token"));
        let mqtt = Source::Mqtt { url: "mqtt://localhost".into(), topic: "t/#".into(), qos: 0 }.checked();
        assert!(mqtt.unwrap_err().contains("qos must be 1"));
    }
}
