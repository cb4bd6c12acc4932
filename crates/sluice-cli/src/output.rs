//! `-o/--output table|json` of the read commands, defined once and flattened into each of them.
//!
//! With `json` a command prints the node's JSON answer, pretty, as one document on stdout and
//! nothing else there, so `sluice functions list -o json | jq` works; hints go to stderr or are
//! left out (the document holds them).

use serde_json::Value;

#[derive(clap::Args, Debug, Clone, Copy)]
pub struct OutputArgs {
    /// Output format: `table` for people, `json` for scripts (the node's answer as it is).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

impl OutputArgs {
    pub fn is_json(self) -> bool {
        self.format == Format::Json
    }

    /// Prints `v` and returns true if the format is JSON; returns false (printing nothing) for a
    /// table, which the caller then prints.
    pub fn json(self, v: &Value) -> anyhow::Result<bool> {
        if !self.is_json() {
            return Ok(false);
        }
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(true)
    }
}
