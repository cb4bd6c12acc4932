//! TLS on the front door (`serve --tls-cert --tls-key`), through the real binary with
//! certificates signed by a test CA made by rcgen: the CLI deploys over `https://` trusting the
//! CA (`SLUICE_CA_CERT`); curl calls the function over HTTP/2 and HTTP/1.1 (ALPN); a new
//! certificate (SIGHUP, or the files changing) serves new connections while one opened before
//! goes on with the old one, and calls over new connections all succeed across the reloads; a
//! broken replacement keeps the one in use; and a node whose certificate cannot serve does not
//! start.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::harness::{BIN, Node, guests};

/// A test CA: its certificate (PEM) and the issuer that signs the node's certificates.
fn test_ca() -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "sluice test CA");
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(params, key))
}

/// A certificate for the node's names signed by the test CA (PEM certificate, PEM key).
fn certificate(ca: &rcgen::Issuer<'static, rcgen::KeyPair>) -> (String, String) {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.use_authority_key_identifier_extension = true;
    params.extended_key_usages.push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let key = rcgen::KeyPair::generate().unwrap();
    (params.signed_by(&key, ca).unwrap().pem(), key.serialize_pem())
}

/// A client trusting `trusted` (PEM certificates), offering HTTP/1.1.
fn client_config(trusted: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in trusted {
        roots.add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to the node, trusting `trusted` (PEM certificates), offering HTTP/1.1.
struct Conn {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl Conn {
    fn open(node: &Node, trusted: &[&str]) -> Conn {
        Self::open_at(&node.url, trusted)
    }

    fn open_at(url: &str, trusted: &[&str]) -> Conn {
        Self::open_with(url, client_config(trusted))
    }

    /// With `config`, whose session cache lets a second connection resume.
    fn open_with(url: &str, config: Arc<rustls::ClientConfig>) -> Conn {
        let addr = url.trim_start_matches("https://");
        let server = ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(config, server).unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.flush().unwrap();
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
        }
        Conn { tls }
    }

    /// The certificate the node served on this connection (PEM-comparable DER).
    fn served(&self) -> Vec<u8> {
        self.tls.conn.peer_certificates().unwrap()[0].to_vec()
    }

    /// `GET path` on this connection (kept alive) with the key `token`: the status line and the
    /// body.
    fn get(&mut self, path: &str, token: &str) -> (String, String) {
        write!(self.tls, "GET {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\n\r\n")
            .unwrap();
        self.tls.flush().unwrap();
        let mut reader = BufReader::new(&mut self.tls);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        let (mut length, mut chunked) = (0, false);
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            let line = line.to_ascii_lowercase();
            if let Some(v) = line.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            chunked |= line.starts_with("transfer-encoding:") && line.contains("chunked");
        }
        let mut body = Vec::new();
        if !chunked {
            body.resize(length, 0);
            reader.read_exact(&mut body).unwrap();
        }
        while chunked {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..size]);
            chunked = size > 0;
        }
        (status.trim_end().to_string(), String::from_utf8(body).unwrap())
    }
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

/// Opens connections until one is served `want` (a reload is not instant), 10 s at most.
fn wait_served(node: &Node, trusted: &[&str], want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Conn::open(node, trusted).served() != want {
        assert!(Instant::now() < deadline, "the node did not load the new certificate in 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `curl` over TLS trusting `ca`: (HTTP version, status, body).
fn curl(node: &Node, ca: &std::path::Path, extra: &[&str], path: &str) -> (String, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(ca)
        .args(["-H", &format!("authorization: Bearer {}", node.token)])
        .args(["-w", "\n%{http_version} %{http_code}"])
        .args(extra)
        .arg(format!("{}{path}", node.url))
        .output()
        .expect("running curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, tail) = text.rsplit_once('\n').unwrap();
    let (version, status) = tail.split_once(' ').unwrap();
    (version.to_string(), status.to_string(), body.to_string())
}

#[test]
fn https_serves_http2_and_http1_and_reloads_its_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, issuer) = test_ca();
    let (cert_a, key_a) = certificate(&issuer);
    let (cert_b, key_b) = certificate(&issuer);
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, &cert_a).unwrap();
    std::fs::write(&key_path, &key_a).unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    let node =
        Node::start(&["--tls-cert", cert_path.to_str().unwrap(), "--tls-key", key_path.to_str().unwrap()]);
    assert!(node.url.starts_with("https://127.0.0.1:"), "{}", node.url);

    // The CLI over https, trusting the test CA.
    let out = Command::new(BIN)
        .args(["deploy", "tg", guests().testguest.to_str().unwrap()])
        .env("SLUICE_URL", &node.url)
        .env("SLUICE_TOKEN", &node.token)
        .env("SLUICE_CA_CERT", &ca_path)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(out.status.success(), "deploy over https: {}", String::from_utf8_lossy(&out.stderr));
    // Not trusting it, the CLI says so.
    let (ok, _, err) = node.cli(&["functions", "list"]);
    assert!(!ok && err.to_lowercase().contains("certificate"), "{err}");

    // curl: HTTP/2 by ALPN, with a request body; HTTP/1.1 when asked.
    let (version, status, body) =
        curl(&node, &ca_path, &["--http2", "--data-binary", "over h2"], "/fn/default/tg/echo");
    assert_eq!((version.as_str(), status.as_str(), body.as_str()), ("2", "200", "over h2"));
    let (version, status, body) = curl(&node, &ca_path, &["--http1.1"], "/fn/default/tg/ok");
    assert_eq!((version.as_str(), status.as_str(), body.as_str()), ("1.1", "200", "ok"));
    let (version, status, _) = curl(&node, &ca_path, &["--http2"], "/v1/node");
    assert_eq!((version.as_str(), status.as_str()), ("2", "200"), "the control API over HTTP/2");

    // A connection opened with certificate A.
    let mut before = Conn::open(&node, &[&ca]);
    assert_eq!(before.served(), der(&cert_a));
    assert_eq!(before.get("/healthz", &node.token), ("HTTP/1.1 200 OK".to_string(), "ok\n".to_string()));

    // A client that comes back resumes its session (stateless tickets): no full handshake.
    let config = client_config(&[&ca]);
    let mut first = Conn::open_with(&node.url, config.clone());
    // The reply carries the tickets the node sent after the handshake.
    first.get("/healthz", &node.token);
    assert_eq!(first.tls.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
    let again = Conn::open_with(&node.url, config);
    assert_eq!(again.tls.conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed));

    // Load through every reload below: a new connection and a call of the function each time,
    // none of which may fail.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, ca, node_url, token) = (stop.clone(), ca.clone(), node.url.clone(), node.token.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let called = std::panic::catch_unwind(|| {
                    Conn::open_at(&node_url, &[&ca]).get("/fn/default/tg/ok", &token)
                });
                match called {
                    Ok((status, body)) if status == "HTTP/1.1 200 OK" && body == "ok" => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };

    // Replaced, and SIGHUP: new connections get B; the one opened before goes on.
    std::fs::write(&cert_path, &cert_b).unwrap();
    std::fs::write(&key_path, &key_b).unwrap();
    let pid = node.child.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_served(&node, &[&ca], &der(&cert_b));
    assert_eq!(before.get("/healthz", &node.token).0, "HTTP/1.1 200 OK", "the open connection was dropped");

    // A broken replacement (a key that is not B's) keeps B, and says why.
    std::fs::write(&key_path, &key_a).unwrap();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.stderr.lock().unwrap().iter().any(|l| l.contains("TLS certificate not reloaded")) {
        assert!(Instant::now() < deadline, "no log line for the refused reload");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(Conn::open(&node, &[&ca]).served(), der(&cert_b));

    // Files changed, no signal: picked up by the node's watch of the files.
    std::fs::write(&cert_path, &cert_a).unwrap();
    wait_served(&node, &[&ca], &der(&cert_a));
    assert_eq!(
        before.get("/fn/default/tg/ok", &node.token),
        ("HTTP/1.1 200 OK".to_string(), "ok".to_string())
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(failed.is_empty(), "calls failed across the reloads ({ok} did not): {failed:?}");
    assert!(ok >= 10, "too few calls to tell: {ok}");
    eprintln!("{ok} calls over new TLS connections across three reloads, 0 failed");
}

#[test]
fn a_node_whose_certificate_cannot_serve_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let (_, issuer) = test_ca();
    let (cert, _) = certificate(&issuer);
    let (_, other_key) = certificate(&issuer);
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &other_key).unwrap();
    for (key, says) in
        [(key_path.clone(), "TLS certificate"), (dir.path().join("missing.pem"), "reading the TLS key")]
    {
        let out = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{err}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--tls-key"), "{err}");
}
