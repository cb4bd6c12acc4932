//! `sluice completions SHELL` writes a script its shell accepts, naming the subcommands.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::harness::BIN;

fn completions(shell: &str) -> String {
    let out = Command::new(BIN).args(["completions", shell]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn bash_accepts_the_script_and_it_completes_subcommands_and_flags() {
    let script = completions("bash");
    let mut bash = Command::new("bash").arg("-n").stdin(Stdio::piped()).spawn().unwrap();
    bash.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(bash.wait().unwrap().success(), "bash -n refused the script");
    for word in ["deploy", "invocations", "tenants", "--tenant"] {
        assert!(script.contains(word), "the bash script lacks {word}");
    }
    // The script registers itself for the binary's name.
    assert!(script.contains("complete -F _sluice"), "{script}");
}

#[test]
fn zsh_and_fish_scripts_name_the_subcommands() {
    let zsh = completions("zsh");
    assert!(zsh.starts_with("#compdef sluice"), "{zsh}");
    assert!(zsh.contains("deploy") && zsh.contains("invocations"));
    let fish = completions("fish");
    assert!(fish.contains("complete -c sluice") && fish.contains("deploy"), "{fish}");
}

#[test]
fn an_unknown_shell_is_refused_with_the_choices() {
    let out = Command::new(BIN).args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bash") && err.contains("zsh") && err.contains("fish"), "{err}");
}
