//! `sluice completions bash|zsh|fish|...`: the shell completion script, generated from the same
//! clap definition that parses the command line (which `main` passes in), so it cannot drift
//! from it.

#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// Shell to write the script for. E.g. `sluice completions bash > /etc/bash_completion.d/sluice`,
    /// or `source <(sluice completions zsh)` in ~/.zshrc.
    pub shell: clap_complete::Shell,
}

pub fn run(args: CompletionsArgs, mut cli: clap::Command) -> anyhow::Result<()> {
    // Generated into memory first: clap_complete panics on a failed write, and a reader that
    // went away (`sluice completions bash | head`) is not an error.
    let mut script = Vec::new();
    write(args.shell, &mut cli, &mut script);
    match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn write(shell: clap_complete::Shell, cli: &mut clap::Command, out: &mut impl std::io::Write) {
    let name = cli.get_name().to_string();
    clap_complete::generate(shell, cli, name, out);
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use clap_complete::Shell;

    fn script(shell: Shell) -> String {
        let mut out = Vec::new();
        super::write(shell, &mut crate::Cli::command(), &mut out);
        String::from_utf8(out).expect("completion scripts are UTF-8")
    }

    #[test]
    fn every_shell_names_the_subcommands_and_their_flags() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let s = script(shell);
            for word in ["deploy", "invocations", "completions", "--tenant", "--output"] {
                assert!(s.contains(word), "{shell} script lacks {word}");
            }
        }
    }
}
