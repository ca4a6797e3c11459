//! Builds the eBPF object with the nightly pinned in the workspace's
//! `[workspace.metadata.leakmon]` and leaves it in `OUT_DIR` for `include_bytes!`.
//!
//! Without bpf-linker on PATH (plain `cargo check`/`clippy` on a machine not set up
//! yet) it writes an empty stub instead, with a warning; the binary then refuses to
//! start with a one-line error saying how to build it properly.

use std::{env, fs, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

const EBPF_OBJECT: &str = "leakmon-probes";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LEAKMON_SKIP_EBPF");
    println!("cargo:rerun-if-env-changed=PATH");
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let toolchain = metadata.workspace_metadata["leakmon"]["ebpf-toolchain"]
        .as_str()
        .ok_or_else(|| anyhow!("workspace metadata leakmon.ebpf-toolchain is missing"))?
        .to_owned();
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "leakmon-ebpf")
        .ok_or_else(|| anyhow!("leakmon-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("leakmon-ebpf manifest has no parent"))?
        .as_str()
        .to_owned();

    let skip = env::var_os("LEAKMON_SKIP_EBPF").is_some_and(|v| v == "1");
    let have_linker = env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join("bpf-linker").is_file()));
    if skip || !have_linker {
        println!(
            "cargo:warning=building without the eBPF object ({}); run `cargo xtask build` for a working binary",
            if skip { "LEAKMON_SKIP_EBPF=1" } else { "bpf-linker not on PATH" }
        );
        let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?).join(EBPF_OBJECT);
        fs::write(&out, []).with_context(|| format!("write stub {}", out.display()))?;
        println!("cargo:rerun-if-changed={root_dir}");
        return Ok(());
    }
    aya_build::build_ebpf(
        [Package { name: "leakmon-ebpf", root_dir: &root_dir, ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
}
