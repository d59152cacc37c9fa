//! Embeds the eBPF object built by `cargo xtask build-ebpf` when it exists.
//!
//! The object lives at `<workspace>/target/bpfel-unknown-none/release/agent-ebpf` (or at
//! `$AGENT_EBPF_OBJECT`). Without it the agent still builds, so clippy and unit tests run on a
//! machine without bpf-linker; such a binary then needs `--ebpf-object PATH` at run time and
//! says so.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rustc-check-cfg=cfg(embedded_ebpf)");
    println!("cargo:rerun-if-env-changed=AGENT_EBPF_OBJECT");
    let object = env::var_os("AGENT_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
                .join("../target/bpfel-unknown-none/release/agent-ebpf")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    if object.is_file() {
        let out =
            PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("agent-ebpf");
        fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
        println!("cargo:rustc-cfg=embedded_ebpf");
    } else {
        println!(
            "cargo:warning=eBPF object not found at {}; run `cargo xtask build-ebpf` to embed it",
            object.display()
        );
    }
}
