//! What the runtime checks of a component's bytes before it compiles them: that they are a
//! component, which memory they start with (it picks the engine), and which WASI packages they
//! may import.

/// The largest initial linear memory that a core module of the component `bytes` defines, read
/// from its memory sections without compiling: it decides the engine a component is compiled
/// for, before it is compiled. `None` when the bytes do not parse (the compile then says why).
pub fn initial_memory_bytes(bytes: &[u8]) -> Option<u64> {
    let mut max = 0u64;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        if let wasmparser::Payload::MemorySection(reader) = payload.ok()? {
            for memory in reader {
                let memory = memory.ok()?;
                let page = memory.page_size_log2.map_or(64 * 1024, |log2| 1u64 << log2.min(16));
                max = max.max(memory.initial.saturating_mul(page));
            }
        }
    }
    Some(max)
}

/// Rejects bytes that are not a component before handing them to the compiler, so the message
/// says what the bytes are rather than where parsing stopped.
pub(crate) fn check_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err("not a WebAssembly binary (it does not start with the \\0asm magic)".into());
    }
    // Bytes 4..8 are a version and a layer: layer 0 is a core module, layer 1 a component.
    if bytes[6..8] == [0, 0] {
        return Err("this is a core WebAssembly module, not a component: build it for the \
                    wasm32-wasip2 target (or wrap it with `wasm-tools component new`)"
            .into());
    }
    Ok(())
}

/// The WASI 0.2 packages sluice links. Anything else a component imports is refused at deploy.
pub(crate) fn import_supported(name: &str) -> bool {
    const PACKAGES: [&str; 7] = [
        "wasi:io/",
        "wasi:clocks/",
        "wasi:random/",
        "wasi:cli/",
        "wasi:filesystem/",
        "wasi:sockets/",
        "wasi:http/",
    ];
    PACKAGES.iter().any(|p| name.starts_with(p)) && name.contains("@0.2.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HEAVY_MEMORY_BYTES;

    #[test]
    fn initial_memory_is_read_from_the_core_modules_of_a_component() {
        let component = |memory: &str| {
            wat::parse_str(format!(
                "(component (core module (memory {memory})) (core module (memory 1)) \
                 (component (core module (memory 3))))"
            ))
            .unwrap()
        };
        // The largest initial memory of any core module, nested components included.
        assert_eq!(initial_memory_bytes(&component("240")), Some(240 * 64 * 1024));
        assert_eq!(initial_memory_bytes(&component("2")), Some(3 * 64 * 1024));
        assert!(initial_memory_bytes(&component("240")).unwrap() >= HEAVY_MEMORY_BYTES);
        let none = wat::parse_str("(component (core module (func)))").unwrap();
        assert_eq!(initial_memory_bytes(&none), Some(0));
        // Bytes that do not parse decide nothing: the compile says what is wrong.
        let mut cut = component("240");
        cut.truncate(cut.len() - 3);
        assert_eq!(initial_memory_bytes(&cut), None);
        assert_eq!(initial_memory_bytes(b"not wasm at all"), None);
    }

    #[test]
    fn header_check_names_the_problem() {
        assert!(check_header(b"hello world").unwrap_err().contains("not a WebAssembly binary"));
        assert!(check_header(b"\0asm\x01\0\0\0").unwrap_err().contains("core WebAssembly module"));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }

    #[test]
    fn supported_imports() {
        assert!(import_supported("wasi:http/types@0.2.4"));
        assert!(import_supported("wasi:cli/environment@0.2.0"));
        assert!(!import_supported("fermyon:spin/key-value@2.0.0"));
        assert!(!import_supported("wasi:keyvalue/store@0.2.0-draft"));
        assert!(!import_supported("wasi:http/types@0.3.0"));
    }
}
