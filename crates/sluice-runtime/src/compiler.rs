//! Compiling in a child process that exits after each compile
//! ([`CompileIn::Child`](crate::CompileIn)).
//!
//! A compile needs far more memory than the artifact it makes (hundreds of MiB for an 18 MB
//! Python component) and runs on threads whose glibc arenas keep what they free: `malloc_trim`
//! gives back free chunks inside an arena but not the top of a thread's arena, so a node that
//! compiled one large component kept 50–60 MiB more resident for good (BENCHMARKS.md). A child
//! gives all of it back when it exits, and a hostile component that makes the compiler blow up
//! hits the child's memory and time limits, not the node's.
//!
//! The protocol is private to this file: the node runs `<program> <args> --cow 0|1 --threads N
//! --memory-bytes-max B --out PATH`, writes the component to the child's stdin and closes it.
//! The child compiles with [`code_config`](crate::engine::code_config) (so its artifact is the
//! serving engine's), writes the artifact to `PATH` and exits 0; a component that does not
//! compile exits [`EXIT_INVALID`] with wasmtime's error on stderr.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sluice_core::{ErrorKind, SluiceError};
use tokio::io::AsyncWriteExt;

/// The child's exit code for a component that does not compile.
const EXIT_INVALID: i32 = 2;
/// The child's exit code for anything else that went wrong (its arguments, its I/O).
const EXIT_FAILED: i32 = 1;
/// What of the child's stderr is kept for the error message.
const STDERR_BYTES_MAX: usize = 4096;

/// The limits a child compile runs under.
pub(crate) struct ChildLimits {
    pub(crate) threads: usize,
    pub(crate) memory_bytes_max: u64,
    pub(crate) timeout: Duration,
}

/// Compiles `bytes` in a child process into an artifact at `out`. The child is killed when the
/// timeout passes or this future is dropped.
pub(crate) async fn compile_in_child(
    program: &Path,
    args: &[String],
    memory_init_cow: bool,
    limits: &ChildLimits,
    bytes: Vec<u8>,
    out: &Path,
) -> Result<(), SluiceError> {
    let invalid = |m: String| SluiceError::new(ErrorKind::InvalidComponent, m);
    let mut command = tokio::process::Command::new(program);
    // `ps` shows the child as the node's own command (`sluice compile-worker …`), not as
    // /proc/self/exe.
    #[cfg(unix)]
    if let Some(arg0) = std::env::args_os().next() {
        command.arg0(arg0);
    }
    let mut child = command
        .args(args)
        .arg("--cow")
        .arg(if memory_init_cow { "1" } else { "0" })
        .arg("--threads")
        .arg(limits.threads.to_string())
        .arg("--memory-bytes-max")
        .arg(limits.memory_bytes_max.to_string())
        .arg("--out")
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| SluiceError::internal(format!("starting the compiler {}: {e}", program.display())))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // The child reads the whole component before it writes anything, so feeding it from a task
    // of its own while waiting below cannot deadlock on a full pipe.
    let feed = tokio::spawn(async move {
        let written = stdin.write_all(&bytes).await;
        drop(stdin);
        written
    });
    let waited = tokio::time::timeout(limits.timeout, child.wait_with_output()).await;
    // A child that stopped reading (it failed, or was killed) breaks the pipe; its exit status
    // below says why, and the broken pipe adds nothing to that.
    let _ = feed.await;
    let output = match waited {
        Ok(output) => output.map_err(|e| SluiceError::internal(format!("waiting for the compiler: {e}")))?,
        Err(_) => {
            let _ = std::fs::remove_file(out);
            return Err(invalid(format!(
                "compiling the component took longer than the node allows a compile ({:?}, serve \
                 --compile-timeout); it is too large or too complex to compile here",
                limits.timeout
            )));
        }
    };
    // Rust's note about RUST_BACKTRACE (the child inherits the node's environment) is not the
    // reason a compile failed.
    let stderr: String = String::from_utf8_lossy(&output.stderr[..output.stderr.len().min(STDERR_BYTES_MAX)])
        .lines()
        .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect::<Vec<_>>()
        .join("\n");
    let stderr = stderr.trim();
    match output.status.code() {
        Some(0) => Ok(()),
        Some(EXIT_INVALID) => Err(invalid(format!("not a valid WebAssembly component: {stderr}"))),
        code => {
            let _ = std::fs::remove_file(out);
            // A compile that runs out of its address space fails an allocation, which aborts.
            if stderr.contains("memory allocation") {
                return Err(invalid(format!(
                    "compiling the component needed more memory than the node allows a compile \
                     ({} MiB, serve --compile-memory): {stderr}",
                    limits.memory_bytes_max >> 20
                )));
            }
            let how = match code {
                Some(code) => format!("exit code {code}"),
                None => format!("{}", output.status),
            };
            Err(SluiceError::internal(format!("the compiler failed ({how}): {stderr}")))
        }
    }
}

/// The child's side: parses the protocol's arguments, limits its own memory and priority,
/// reads the component from stdin, compiles it and writes the artifact. Returns the process's
/// exit code.
pub fn compile_worker_main(args: &[String]) -> i32 {
    match worker(args) {
        Ok(()) => 0,
        Err((code, message)) => {
            let _ = writeln!(std::io::stderr(), "{message}");
            code
        }
    }
}

fn worker(args: &[String]) -> Result<(), (i32, String)> {
    let failed = |m: String| (EXIT_FAILED, m);
    let mut cow = None;
    let mut threads = None;
    let mut memory_bytes_max = None;
    let mut out = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| failed(format!("{flag} needs a value")))?;
        match flag.as_str() {
            "--cow" => cow = Some(value == "1"),
            "--threads" => threads = value.parse::<usize>().ok().filter(|n| *n > 0),
            "--memory-bytes-max" => memory_bytes_max = value.parse::<u64>().ok(),
            "--out" => out = Some(PathBuf::from(value)),
            _ => return Err(failed(format!("unknown argument {flag}"))),
        }
    }
    let (Some(cow), Some(threads), Some(memory_bytes_max), Some(out)) = (cow, threads, memory_bytes_max, out)
    else {
        return Err(failed("usage: --cow 0|1 --threads N --memory-bytes-max BYTES --out PATH".into()));
    };
    die_with_the_node();
    limit_address_space(memory_bytes_max).map_err(|e| failed(format!("setting the memory limit: {e}")))?;
    // Threads inherit the nice value of the thread that makes them: the whole compile runs at
    // the priority the node's compile pool has.
    crate::lanes::nice_this_thread(10);
    let mut bytes = Vec::new();
    std::io::stdin().read_to_end(&mut bytes).map_err(|e| failed(format!("reading the component: {e}")))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| failed(format!("starting the compile threads: {e}")))?;
    let engine = wasmtime::Engine::new(&crate::engine::code_config(cow))
        .map_err(|e| failed(format!("making the compile engine: {e:#}")))?;
    let artifact =
        pool.install(|| engine.precompile_component(&bytes)).map_err(|e| (EXIT_INVALID, format!("{e:#}")))?;
    std::fs::write(&out, &artifact).map_err(|e| failed(format!("writing {}: {e}", out.display())))
}

/// A node that is killed (SIGKILL, OOM) cannot kill its compile: the kernel does, so no orphan
/// compiles on for minutes. Its temporary file is the artifact collector's to remove. (The signal
/// follows the *thread* that spawned the child: an async runtime's worker, which lives as long as
/// the node.)
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_the_node() {
    // SAFETY: plain syscalls on this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // The node may have died before the line above: then this process was reparented.
        if libc::getppid() == 1 {
            libc::_exit(EXIT_FAILED);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_the_node() {}

/// Caps the process's address space, so a compile that would need more fails its allocation
/// instead of taking the machine's memory.
#[allow(unsafe_code)]
fn limit_address_space(bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
    // SAFETY: a plain syscall on this process with a valid, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_refuses_arguments_it_does_not_know() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(worker(&args(&["--cow"])).unwrap_err().0, EXIT_FAILED);
        assert_eq!(worker(&args(&["--bogus", "1"])).unwrap_err().0, EXIT_FAILED);
        let missing = worker(&args(&["--cow", "1", "--threads", "1"])).unwrap_err();
        assert!(missing.1.starts_with("usage:"), "{}", missing.1);
    }
}
