//! `sluice new NAME`: writes a Rust function project in `./NAME` that builds with
//! `cargo build --release --target wasm32-wasip2` and deploys as it is.
//!
//! The project needs no sluice SDK: it exports `wasi:http/incoming-handler` through the `wasip2`
//! bindings, like `examples/hello`, and ships that example's `Cargo.lock`, so a machine that has
//! built the example resolves the same versions without asking the registry.

use std::path::Path;

use anyhow::{Context, bail};

#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// Name of the project, its directory and the function: 1-63 characters of a-z, 0-9 and '-',
    /// starting with a letter (it must be both a crate name and a function name).
    pub name: String,
}

/// The template, embedded so the binary is all a user needs. `{{name}}` is the package and
/// function name, `{{wasm}}` the file name of the built component (the crate name with '-' as
/// '_', as cargo writes it).
const FILES: [(&str, &str); 6] = [
    ("Cargo.toml", include_str!("../templates/new/Cargo.toml")),
    ("Cargo.lock", include_str!("../templates/new/Cargo.lock")),
    (".cargo/config.toml", include_str!("../templates/new/cargo-config.toml")),
    ("src/lib.rs", include_str!("../templates/new/lib.rs")),
    ("README.md", include_str!("../templates/new/README.md")),
    (".gitignore", include_str!("../templates/new/gitignore")),
];

/// Names cargo refuses for a package (Rust keywords, its built-in libraries, its own directory
/// names), checked here so the error comes before any file is written.
#[rustfmt::skip]
const RESERVED: &[&str] = &[
    "abstract", "alloc", "as", "async", "await", "become", "box", "break", "build", "const",
    "continue", "core", "crate", "deps", "do", "dyn", "else", "enum", "examples", "extern", "false",
    "final", "fn", "for", "gen", "if", "impl", "in", "incremental", "let", "loop", "macro", "match",
    "mod", "move", "mut", "override", "priv", "proc-macro", "pub", "ref", "return", "self",
    "static", "std", "struct", "super", "test", "trait", "true", "try", "type", "typeof", "unsafe",
    "unsized", "use", "virtual", "where", "while", "yield",
];

pub fn run(args: NewArgs) -> anyhow::Result<()> {
    let name = args.name.as_str();
    check_name(name)?;
    let dir = Path::new(name);
    if dir.exists() {
        bail!("./{name} already exists: choose another name, or move it away first");
    }
    write_project(dir, name)?;
    let wasm = wasm_file(name);
    println!("created ./{name}: a Rust function exporting wasi:http/incoming-handler (src/lib.rs)");
    println!();
    println!("next:");
    println!("  cd {name}");
    println!("  cargo build --release --target wasm32-wasip2");
    println!("  sluice deploy {name} target/wasm32-wasip2/release/{wasm}");
    println!("  sluice invoke {name} /hello");
    Ok(())
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let rule = "a name is 1-63 characters of a-z, 0-9 and '-', starting with a letter";
    if !sluice_core::ids::valid_name(name) || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        bail!("invalid name {name:?}: {rule} (it names the crate, its directory and the function)");
    }
    if RESERVED.contains(&name) || RESERVED.contains(&name.replace('-', "_").as_str()) {
        bail!("invalid name {name:?}: cargo reserves it (a Rust keyword or a built-in name); pick another");
    }
    Ok(())
}

/// The component cargo builds from the crate `name`.
fn wasm_file(name: &str) -> String {
    format!("{}.wasm", name.replace('-', "_"))
}

fn write_project(dir: &Path, name: &str) -> anyhow::Result<()> {
    // `create_dir` (not `_all`) also refuses a directory created since the check above.
    std::fs::create_dir(dir).with_context(|| format!("creating ./{name}"))?;
    let wasm_stem = name.replace('-', "_");
    for (path, text) in FILES {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let text = text.replace("{{name}}", name).replace("{{wasm}}", &wasm_stem);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_suit_cargo_and_sluice() {
        for good in ["demo", "my-fn", "a1", "thumbnailer-2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Demo", "1fn", "-x", "my_fn", "a.b", "fn", "self", "test", "build", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(wasm_file("my-fn"), "my_fn.wasm");
    }

    #[test]
    fn the_template_pins_the_versions_of_examples_hello() {
        // The project is meant to resolve exactly what the example resolves; if the example moves
        // on, the template must follow (copy its Cargo.lock and dependency line).
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let lock = std::fs::read_to_string(root.join("examples/hello/Cargo.lock")).unwrap();
        assert_eq!(lock.replace("name = \"hello\"\n", "name = \"{{name}}\"\n"), FILES[1].1);
        let manifest = std::fs::read_to_string(root.join("examples/hello/Cargo.toml")).unwrap();
        let dependency = |m: &str| m.lines().find(|l| l.starts_with("wasip2 ")).map(str::to_string);
        assert_eq!(dependency(&manifest), dependency(FILES[0].1));
    }

    #[test]
    fn writes_every_file_with_the_name_and_refuses_an_existing_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("my-fn");
        write_project(&dir, "my-fn").unwrap();
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("name = \"my-fn\""), "{manifest}");
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(readme.contains("sluice deploy my-fn target/wasm32-wasip2/release/my_fn.wasm"), "{readme}");
        for (path, _) in FILES {
            let text = std::fs::read_to_string(dir.join(path)).unwrap();
            assert!(!text.contains("{{"), "{path} kept a placeholder");
        }
        assert!(write_project(&dir, "my-fn").is_err());
    }
}
