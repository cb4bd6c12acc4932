//! `sluice new NAME [--lang rust|python|js]`: writes a function project in `./NAME` that builds
//! with one command and deploys as it is.
//!
//! No project needs a sluice SDK: each exports `wasi:http/incoming-handler` with its language's
//! ordinary tool and ships the pins of the matching example. Rust uses the `wasip2` bindings and
//! `examples/hello`'s `Cargo.lock`, so a machine that has built the example resolves the same
//! versions without asking the registry. Python is built by componentize-py (PyPI, the version
//! `scripts/build-examples.sh` installs) and JavaScript by componentize-js (npm, `examples/js`'s
//! `package-lock.json`); both carry the WIT files of their example.

use std::path::Path;

use anyhow::{Context, bail};

#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// Name of the project, its directory and the function: 1-63 characters of a-z, 0-9 and '-',
    /// starting with a letter (for Rust it is also the crate's name).
    pub name: String,
    /// Language of the project.
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    pub lang: Lang,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    /// cargo for wasm32-wasip2, with the wasip2 bindings.
    Rust,
    /// componentize-py (its build.sh installs it into the project's .venv).
    Python,
    /// componentize-js (npm).
    Js,
}

/// A template file: its path in the project, its text, and whether it is executable.
type File = (&'static str, &'static str, bool);

/// The templates, embedded so the binary is all a user needs. `{{name}}` is the function name
/// (and the Rust package's), `{{wasm}}` the Rust component's file name without `.wasm` (the crate
/// name with '-' as '_', as cargo writes it). The WIT files are the examples' own, unchanged.
const RUST: &[File] = &[
    ("Cargo.toml", include_str!("../templates/new/Cargo.toml"), false),
    ("Cargo.lock", include_str!("../templates/new/Cargo.lock"), false),
    (".cargo/config.toml", include_str!("../templates/new/cargo-config.toml"), false),
    ("src/lib.rs", include_str!("../templates/new/lib.rs"), false),
    ("README.md", include_str!("../templates/new/README.md"), false),
    (".gitignore", include_str!("../templates/new/gitignore"), false),
];

const PYTHON: &[File] = &[
    ("app.py", include_str!("../templates/new-python/app.py"), false),
    ("build.sh", include_str!("../templates/new-python/build.sh"), true),
    ("requirements.txt", include_str!("../templates/new-python/requirements.txt"), false),
    ("wit/world.wit", include_str!("../templates/new-python/world.wit"), false),
    ("wit/deps/cli.wit", include_str!("../../../examples/python/wit/deps/cli.wit"), false),
    ("wit/deps/clocks.wit", include_str!("../../../examples/python/wit/deps/clocks.wit"), false),
    ("wit/deps/filesystem.wit", include_str!("../../../examples/python/wit/deps/filesystem.wit"), false),
    ("wit/deps/http.wit", include_str!("../../../examples/python/wit/deps/http.wit"), false),
    ("wit/deps/io.wit", include_str!("../../../examples/python/wit/deps/io.wit"), false),
    ("wit/deps/random.wit", include_str!("../../../examples/python/wit/deps/random.wit"), false),
    ("wit/deps/sockets.wit", include_str!("../../../examples/python/wit/deps/sockets.wit"), false),
    ("README.md", include_str!("../templates/new-python/README.md"), false),
    (".gitignore", include_str!("../templates/new-python/gitignore"), false),
];

const JS: &[File] = &[
    ("app.js", include_str!("../templates/new-js/app.js"), false),
    ("package.json", include_str!("../templates/new-js/package.json"), false),
    ("package-lock.json", include_str!("../templates/new-js/package-lock.json"), false),
    ("wit/world.wit", include_str!("../templates/new-js/world.wit"), false),
    (
        "wit/deps/wasi-cli-0.2.10/package.wit",
        include_str!("../../../examples/js/wit/deps/wasi-cli-0.2.10/package.wit"),
        false,
    ),
    (
        "wit/deps/wasi-clocks-0.2.10/package.wit",
        include_str!("../../../examples/js/wit/deps/wasi-clocks-0.2.10/package.wit"),
        false,
    ),
    (
        "wit/deps/wasi-http-0.2.10/package.wit",
        include_str!("../../../examples/js/wit/deps/wasi-http-0.2.10/package.wit"),
        false,
    ),
    (
        "wit/deps/wasi-io-0.2.10/package.wit",
        include_str!("../../../examples/js/wit/deps/wasi-io-0.2.10/package.wit"),
        false,
    ),
    (
        "wit/deps/wasi-random-0.2.10/package.wit",
        include_str!("../../../examples/js/wit/deps/wasi-random-0.2.10/package.wit"),
        false,
    ),
    ("README.md", include_str!("../templates/new-js/README.md"), false),
    (".gitignore", include_str!("../templates/new-js/gitignore"), false),
];

impl Lang {
    fn files(self) -> &'static [File] {
        match self {
            Lang::Rust => RUST,
            Lang::Python => PYTHON,
            Lang::Js => JS,
        }
    }
}

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
    check_name(name, args.lang)?;
    let dir = Path::new(name);
    if dir.exists() {
        bail!("./{name} already exists: choose another name, or move it away first");
    }
    write_project(dir, name, args.lang)?;
    let (what, build, wasm) = match args.lang {
        Lang::Rust => (
            "a Rust function exporting wasi:http/incoming-handler (src/lib.rs)",
            "cargo build --release --target wasm32-wasip2".to_string(),
            format!("target/wasm32-wasip2/release/{}", wasm_file(name)),
        ),
        Lang::Python => (
            "a Python function exporting wasi:http/incoming-handler (app.py)",
            "./build.sh                # installs componentize-py into .venv the first time".to_string(),
            format!("{name}.wasm"),
        ),
        Lang::Js => (
            "a JavaScript function exporting wasi:http/incoming-handler (app.js)",
            "npm ci && npm run build".to_string(),
            format!("{name}.wasm"),
        ),
    };
    println!("created ./{name}: {what}");
    println!();
    println!("next:");
    println!("  cd {name}");
    println!("  {build}");
    println!("  sluice deploy {name} {wasm}");
    println!("  sluice invoke {name} /hello");
    Ok(())
}

fn check_name(name: &str, lang: Lang) -> anyhow::Result<()> {
    let rule = "a name is 1-63 characters of a-z, 0-9 and '-', starting with a letter";
    if !sluice_core::ids::valid_name(name) || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        bail!("invalid name {name:?}: {rule} (it names the project, its directory and the function)");
    }
    if lang == Lang::Rust && (RESERVED.contains(&name) || RESERVED.contains(&name.replace('-', "_").as_str()))
    {
        bail!("invalid name {name:?}: cargo reserves it (a Rust keyword or a built-in name); pick another");
    }
    Ok(())
}

/// The component cargo builds from the crate `name`.
fn wasm_file(name: &str) -> String {
    format!("{}.wasm", name.replace('-', "_"))
}

fn write_project(dir: &Path, name: &str, lang: Lang) -> anyhow::Result<()> {
    // `create_dir` (not `_all`) also refuses a directory created since the check above.
    std::fs::create_dir(dir).with_context(|| format!("creating ./{name}"))?;
    let wasm_stem = name.replace('-', "_");
    for &(path, text, executable) in lang.files() {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let text = text.replace("{{name}}", name).replace("{{wasm}}", &wasm_stem);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        if executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {} executable", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn template(lang: Lang, path: &str) -> &'static str {
        lang.files().iter().find(|f| f.0 == path).unwrap().1
    }

    #[test]
    fn names_must_suit_cargo_and_sluice() {
        for good in ["demo", "my-fn", "a1", "thumbnailer-2"] {
            assert!(check_name(good, Lang::Rust).is_ok(), "{good}");
        }
        for bad in ["", "Demo", "1fn", "-x", "my_fn", "a.b", "fn", "self", "test", "build", &"a".repeat(64)] {
            assert!(check_name(bad, Lang::Rust).is_err(), "{bad:?} was accepted");
        }
        // Only cargo reserves Rust's words.
        assert!(check_name("fn", Lang::Python).is_ok() && check_name("test", Lang::Js).is_ok());
        assert!(check_name("My_Fn", Lang::Js).is_err());
        assert_eq!(wasm_file("my-fn"), "my_fn.wasm");
    }

    #[test]
    fn the_template_pins_the_versions_of_examples_hello() {
        // The project is meant to resolve exactly what the example resolves; if the example moves
        // on, the template must follow (copy its Cargo.lock and dependency line).
        let lock = std::fs::read_to_string(root().join("examples/hello/Cargo.lock")).unwrap();
        assert_eq!(
            lock.replace("name = \"hello\"\n", "name = \"{{name}}\"\n"),
            template(Lang::Rust, "Cargo.lock")
        );
        let manifest = std::fs::read_to_string(root().join("examples/hello/Cargo.toml")).unwrap();
        let dependency = |m: &str| m.lines().find(|l| l.starts_with("wasip2 ")).map(str::to_string);
        assert_eq!(dependency(&manifest), dependency(template(Lang::Rust, "Cargo.toml")));
    }

    #[test]
    fn the_python_and_js_templates_pin_what_their_examples_build_with() {
        // JS: the example's lockfile and dependencies, so `npm ci` finds them in npm's cache.
        let lock = std::fs::read_to_string(root().join("examples/js/package-lock.json")).unwrap();
        assert_eq!(
            lock.replace("\"name\": \"greet\"", "\"name\": \"{{name}}\""),
            template(Lang::Js, "package-lock.json")
        );
        let manifest =
            |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap()["devDependencies"].clone();
        let example = std::fs::read_to_string(root().join("examples/js/package.json")).unwrap();
        assert_eq!(manifest(&example), manifest(template(Lang::Js, "package.json")));
        // Python: the componentize-py version scripts/build-examples.sh installs.
        let script = std::fs::read_to_string(root().join("scripts/build-examples.sh")).unwrap();
        let version = script.lines().find_map(|l| l.strip_prefix("COMPONENTIZE_PY=")).unwrap();
        assert_eq!(template(Lang::Python, "requirements.txt"), format!("componentize-py=={version}\n"));
    }

    #[test]
    fn writes_every_file_with_the_name_and_refuses_an_existing_directory() {
        let tmp = tempfile::tempdir().unwrap();
        for (lang, deploy) in [
            (Lang::Rust, "sluice deploy my-fn target/wasm32-wasip2/release/my_fn.wasm"),
            (Lang::Python, "sluice deploy my-fn my-fn.wasm"),
            (Lang::Js, "sluice deploy my-fn my-fn.wasm"),
        ] {
            let dir = tmp.path().join(format!("{lang:?}")).join("my-fn");
            std::fs::create_dir(dir.parent().unwrap()).unwrap();
            write_project(&dir, "my-fn", lang).unwrap();
            let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
            assert!(readme.contains(deploy), "{readme}");
            for (path, _, _) in lang.files() {
                let text = std::fs::read_to_string(dir.join(path)).unwrap();
                assert!(!text.contains("{{"), "{lang:?}: {path} kept a placeholder");
            }
            assert!(write_project(&dir, "my-fn", lang).is_err());
        }
        let manifest = std::fs::read_to_string(tmp.path().join("Rust/my-fn/Cargo.toml")).unwrap();
        assert!(manifest.contains("name = \"my-fn\""), "{manifest}");
        let build = tmp.path().join("Python/my-fn/build.sh");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&build).unwrap().permissions().mode() & 0o111,
            0o111,
            "build.sh is executable"
        );
        assert!(std::fs::read_to_string(build).unwrap().contains("-o my-fn.wasm"));
    }
}
