//! Starts a node, waits for its `listening on http://ADDR/` line, and offers a few helpers.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// Paths of the built guests, built once per test process.
pub struct Guests {
    pub hello: PathBuf,
    pub testguest: PathBuf,
}

pub fn guests() -> &'static Guests {
    static GUESTS: OnceLock<Guests> = OnceLock::new();
    GUESTS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out =
            Command::new(root.join("scripts/build-guests.sh")).output().expect("running build-guests.sh");
        assert!(out.status.success(), "building guests failed: {}", String::from_utf8_lossy(&out.stderr));
        let paths: Vec<PathBuf> = String::from_utf8(out.stdout).unwrap().lines().map(PathBuf::from).collect();
        Guests { hello: paths[0].clone(), testguest: paths[1].clone() }
    })
}

/// Paths of the example function in each language (examples/rust, python, js), built once per
/// test process by `scripts/build-examples.sh --no-install`: the tests build with the tools that
/// script installed and never install anything themselves.
pub struct Examples {
    pub rust: PathBuf,
    pub python: PathBuf,
    pub js: PathBuf,
}

pub fn examples() -> &'static Examples {
    static EXAMPLES: OnceLock<Examples> = OnceLock::new();
    EXAMPLES.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new(root.join("scripts/build-examples.sh"))
            .arg("--no-install")
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("running scripts/build-examples.sh");
        assert!(
            out.status.success(),
            "building the examples failed; run scripts/build-examples.sh first (it installs \
             componentize-py and componentize-js; CI runs it):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let paths: Vec<PathBuf> = String::from_utf8(out.stdout).unwrap().lines().map(PathBuf::from).collect();
        assert_eq!(paths.len(), 3, "build-examples.sh printed {paths:?}");
        Examples { rust: paths[0].clone(), python: paths[1].clone(), js: paths[2].clone() }
    })
}

/// A client builder for the tests. reqwest's TLS (rustls, for the `https://` tests) has no
/// crypto provider of its own here: the process's default (ring, as in the binary) is installed
/// first.
pub fn http_builder() -> reqwest::blocking::ClientBuilder {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::blocking::Client::builder()
}

/// A client with reqwest's defaults (see [`http_builder`]).
pub fn http() -> reqwest::blocking::Client {
    http_builder().build().unwrap()
}

pub struct Node {
    pub child: Option<Child>,
    pub url: String,
    pub token: String,
    pub dir: tempfile::TempDir,
    pub stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    args: Vec<String>,
    /// Environment variables of the process, beside the test's own (kept for restarts).
    pub env: Vec<(String, String)>,
    /// `--listen` of every (re)start: port 0 by default; a fixed port keeps the URL across
    /// restarts.
    pub listen: String,
}

impl Node {
    pub fn start(extra: &[&str]) -> Node {
        Self::start_with_env(extra, &[])
    }

    /// Starts a node with `env` set in its environment.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut node = Node {
            child: None,
            url: String::new(),
            token: String::new(),
            dir,
            stderr: Default::default(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            listen: "127.0.0.1:0".to_string(),
        };
        node.spawn();
        node
    }

    /// Starts (or restarts) the process on the same data directory.
    pub fn spawn(&mut self) {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--listen")
            .arg(&self.listen)
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting sluice");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = self.stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let url = rest.split_whitespace().next().unwrap().trim_end_matches('/').to_string();
                    let _ = tx.send(url);
                }
                lines.lock().unwrap().push(line);
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("sluice did not start: {:?}", self.stderr.lock().unwrap()));
        self.url = url;
        // A node joining a cluster whose database already has keys creates no token of its own:
        // the test gives it one.
        if let Ok(token) = std::fs::read_to_string(self.dir.path().join("admin.token")) {
            self.token = token.trim().to_string();
        }
        self.child = Some(child);
    }

    /// Kills the process with SIGKILL: no shutdown at all.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("node running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("node running");
        let pid = child.id() as i32;
        // SAFETY-free: sending a signal through the `kill` command keeps this test crate free of
        // unsafe code.
        Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "sluice did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the CLI against this node with the admin key; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        self.cli_as(&self.token, args)
    }

    /// Runs the CLI against this node with `key`; returns (success, stdout, stderr).
    pub fn cli_as(&self, key: &str, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .env("SLUICE_URL", &self.url)
            .env("SLUICE_TOKEN", key)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Deploys through the CLI and panics with its output if that fails.
    pub fn deploy(&self, name: &str, wasm: &Path, flags: &[&str]) -> String {
        let mut args = vec!["deploy", name, wasm.to_str().unwrap()];
        args.extend_from_slice(flags);
        let (ok, out, err) = self.cli(&args);
        assert!(ok, "deploy failed: {out}{err}");
        out
    }

    pub fn client(&self) -> reqwest::blocking::Client {
        crate::harness::http_builder().timeout(Duration::from_secs(60)).build().unwrap()
    }

    /// Queues an async call of `path` (`Prefer: respond-async`, with `headers`) with the admin key;
    /// returns its invocation id, and panics unless it was accepted (202).
    pub fn enqueue(&self, path: &str, headers: &[(&str, &str)]) -> String {
        let mut req = self
            .client()
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .header("prefer", "respond-async");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().unwrap();
        assert_eq!(res.status(), 202, "{path}");
        res.json::<Value>().unwrap()["id"].as_str().unwrap().to_string()
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        self.client().get(format!("{}{path}", self.url)).bearer_auth(&self.token).send().unwrap()
    }

    /// Calls `path` until it is admitted (200) while the only refusal is the concurrency cap
    /// (429): a slot comes back when the guest holding it is done, which can be a moment after
    /// its client went away or had the whole response. Panics if that takes longer than `within`.
    pub fn wait_until_admitted(&self, path: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let status = self.get(path).status();
            if status == 200 {
                return;
            }
            assert_eq!(status, 429, "only the concurrency cap may refuse {path}");
            assert!(Instant::now() < deadline, "the slot of {path} was not given back within {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until at least `n` sync calls are in flight on the node (admitted and not yet
    /// ended), as its `sluice_sync_inflight` gauge says: a call started from another thread is
    /// known to hold its slot, without guessing how long that takes on a loaded machine.
    pub fn wait_sync_in_flight(&self, n: u64) {
        wait_until(&format!("{n} sync calls in flight"), || {
            let metrics = self.get("/metrics").text().unwrap();
            let gauge = metrics.lines().find_map(|l| l.strip_prefix("sluice_sync_inflight "));
            gauge.and_then(|v| v.trim().parse::<f64>().ok()).is_some_and(|v| v >= n as f64)
        });
    }

    /// Polls `path` until `pred` holds (records are written in batches, off the request path).
    pub fn wait_json(&self, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let res = self.get(path);
            if res.status().is_success() {
                let v: Value = res.json().unwrap();
                if pred(&v) {
                    return v;
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting on {path}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `condition` until it holds; panics, naming `what`, if that takes more than 10 s.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts a sluice error response: status, JSON code, and the sluice-error header.
pub fn assert_error(res: reqwest::blocking::Response, status: u16, code: &str) -> String {
    assert_eq!(res.status().as_u16(), status, "unexpected status");
    assert_eq!(res.headers().get("sluice-error").map(|v| v.to_str().unwrap()), Some(code));
    let v: Value = res.json().expect("error body is JSON");
    assert_eq!(v["error"]["code"], code, "{v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

/// A minimal component binary that imports one empty instance under each name and exports
/// nothing: enough for the deploy-time import check, written out by hand so the tests need no
/// wasm toolchain. Layout: preamble, a type section with one empty instance type, an import
/// section naming it once per import.
pub fn component_importing(names: &[&str]) -> Vec<u8> {
    let mut out = b"\0asm\x0d\0\x01\0".to_vec();
    out.extend_from_slice(&[0x07, 0x03, 0x01, 0x42, 0x00]);
    let mut imports = vec![names.len() as u8];
    for name in names {
        imports.push(0x00);
        imports.push(name.len() as u8);
        imports.extend_from_slice(name.as_bytes());
        imports.extend_from_slice(&[0x05, 0x00]);
    }
    out.push(0x0a);
    out.push(imports.len() as u8);
    out.extend_from_slice(&imports);
    out
}

/// `wasm` with a custom section appended that holds `n`: a component that runs exactly like
/// `wasm` but has a digest of its own (custom sections may follow any section).
pub fn distinct(wasm: &[u8], n: u64) -> Vec<u8> {
    fn leb128(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"sluice-distinct";
    let mut payload = Vec::new();
    leb128(name.len() as u64, &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(&n.to_le_bytes());
    let mut out = wasm.to_vec();
    out.push(0x00);
    leb128(payload.len() as u64, &mut out);
    out.extend_from_slice(&payload);
    out
}

/// Reads one request from a test server's connection: its head (as text) and its body (by
/// `content-length`; none without one). `None` when the client closed first.
pub fn read_request(stream: &mut std::net::TcpStream) -> Option<(String, Vec<u8>)> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>())
        })
        .map(|r| r.expect("a numeric content-length"))
        .unwrap_or(0);
    let mut body = bytes[head_end..].to_vec();
    while body.len() < length {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    Some((head, body))
}

/// Taken by the tests that keep both cores busy for long (building and compiling the Python and
/// JavaScript components) and by the chaos tests, so that they never run at the same time. A
/// node runs async work on its slow lane, whose threads have the lowest OS priority
/// (`SCHED_IDLE`); a component compile in another test's node starves them, and the chaos test
/// then sees its calls stay queued or running past its deadline.
pub fn cpu_heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
