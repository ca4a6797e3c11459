//! Project tasks: set up the build chain, build, run, test, package, benchmark.
//!
//! Every task first runs the idempotent set-up, so a fresh Debian machine needs nothing
//! but cargo: Debian's LLVM 22 (for bpf-linker), the pinned nightly with rust-src, and
//! bpf-linker itself, all at the versions pinned in the workspace `Cargo.toml`
//! (`[workspace.metadata.leakmon]`).

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod bench_python;
mod bench_runtimes;
mod bench_sampling;
mod bench_server;

#[derive(Parser)]
#[command(name = "xtask", about = "leakmon project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs (idempotent): Debian packages, the pinned nightly
    /// with rust-src, bpf-linker.
    Setup {
        /// Also install what the tests need (C/C++ compilers, valgrind, bpftool, other
        /// allocators, redis).
        #[arg(long)]
        tests: bool,
    },
    /// Build leakmon with its eBPF programs embedded.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build (release) and start leakmon as root. Arguments after `--` go to
    /// leakmon; the default is `run`.
    Run {
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Measure the cost of one malloc+free pair under leakmon and its peers (no probes,
    /// the bpftrace uprobe floor, a memleak-equivalent bpftrace script, heaptrack), in
    /// one run, conditions alternated; prints a table and writes JSON to target/bench.
    Bench {
        /// Rounds; each runs every workload under every condition once.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// malloc+free pairs per run (half as many for the realloc workload).
        #[arg(long, default_value_t = 100_000)]
        pairs: u64,
        /// Skip the host-scale figures (1,000 idle processes, a million live blocks,
        /// 2^17 stacks, scrape latency).
        #[arg(long)]
        skip_scale: bool,
        /// Only the malloc+free pair workloads (their table, without the sampling,
        /// server, runtime and host-scale figures).
        #[arg(long)]
        pairs_only: bool,
        /// Only the server workload (redis-server under redis-benchmark).
        #[arg(long)]
        server_only: bool,
        /// Only the CPython workload (small objects under the agent and tracemalloc).
        #[arg(long)]
        python_only: bool,
        /// Only the Node.js workload (its speed while `report --runtime` samples it).
        #[arg(long)]
        node_only: bool,
        /// Only the JVM workload (its speed while `report --runtime` records it).
        #[arg(long)]
        jvm_only: bool,
        /// Only the host-scale figures (the always-on tier at 1,000 and 10,000 idle
        /// processes through each reader beside the /proc floor, a million live blocks,
        /// 2^17 stacks read in batches and entry by entry, scrape latency).
        #[arg(long)]
        scale_only: bool,
    },
    /// Build the Debian package (cargo-deb, installed at the pinned version if
    /// missing): target/debian/leakmon_VERSION-1_ARCH.deb.
    Deb,
    /// Set up and run every test, the real-eBPF ones included (needs root). The
    /// Debian package is built first; its test checks and installs it.
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
}

/// The pinned build chain, from the workspace manifest.
struct Pins {
    /// Builds leakmon, the tests and cargo's tools.
    host_toolchain: String,
    /// Builds the eBPF programs.
    toolchain: String,
    bpf_linker: String,
    llvm: String,
    cargo_deb: String,
    grafana_schema: String,
    typescript: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root).context("enter the workspace")?;
    let pins = pins()?;
    // Every cargo this task starts builds with the pinned host toolchain, whichever one
    // built xtask itself.
    env::set_var("RUSTUP_TOOLCHAIN", &pins.host_toolchain);
    match cli.task {
        Task::Setup { tests } => setup(&pins, tests),
        Task::Build { release } => {
            setup(&pins, false)?;
            build(release)
        }
        Task::Run { args } => {
            setup(&pins, false)?;
            build(true)?;
            require_root("leakmon loads eBPF programs")?;
            let args = if args.is_empty() { vec![OsString::from("run")] } else { args };
            let status = Command::new(root.join("target/release/leakmon")).args(args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Bench {
            rounds,
            pairs,
            skip_scale,
            pairs_only,
            server_only,
            python_only,
            node_only,
            jvm_only,
            scale_only,
        } => {
            setup(&pins, false)?;
            apt_install(
                &[
                    "bpftrace",
                    "heaptrack",
                    "gcc",
                    "redis-server",
                    "redis-tools",
                    "nodejs",
                    "python3",
                    "openjdk-17-jdk-headless",
                ]
                .map(str::to_owned),
            )?;
            build(true)?;
            require_root("the benchmark loads eBPF programs")?;
            let only = match (pairs_only, server_only, python_only, node_only, jvm_only) {
                _ if scale_only => Some(bench::Only::Scale),
                (true, ..) => Some(bench::Only::Pairs),
                (_, true, ..) => Some(bench::Only::Server),
                (_, _, true, ..) => Some(bench::Only::Python),
                (_, _, _, true, _) => Some(bench::Only::Node),
                (.., true) => Some(bench::Only::Jvm),
                _ => None,
            };
            bench::bench(&root, rounds.max(1), pairs.max(1000), !skip_scale, only)
        }
        Task::Deb => {
            setup(&pins, false)?;
            let deb = deb(&pins)?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Test { args } => {
            setup(&pins, true)?;
            require_root("the tests load real eBPF programs into the kernel")?;
            let started = Instant::now();
            lint()?;
            let package = deb(&pins)?;
            // The default members: the eBPF crate only builds for the bpf target (build.rs
            // builds it), so `--workspace` would try to compile it for the host.
            // With the fail points built in: the tests of loads that fail where nothing
            // outside a process can make them fail force those failures through them.
            let Outcome { passed, failed, ignored } = run_tests(
                cargo()
                    .args(["test", "--no-fail-fast", "--features", "leakmon/failpoints"])
                    .args(&args)
                    .env("LEAKMON_DEB", &package),
            )?;
            eprintln!("xtask: tests finished in {:.0?}", started.elapsed());
            println!("tests: {} run, {passed} passed, {failed} failed, {ignored} skipped", passed + failed);
            if failed > 0 || passed == 0 {
                bail!("tests failed");
            }
            // A test that cannot run here is a missing set-up step, not a pass: tests
            // panic rather than return early, and an ignored one fails the run too.
            if ignored > 0 {
                bail!("{ignored} tests were skipped (ignored): every test must run");
            }
            Ok(())
        }
    }
}

/// Builds the .deb with cargo-deb (installed at the pinned version first) and returns
/// its path.
fn deb(pins: &Pins) -> Result<PathBuf> {
    let tool = cargo_bin().join("cargo-deb");
    let have = output(Command::new(&tool).arg("--version")).unwrap_or_default();
    if !have.split_whitespace().any(|w| w == pins.cargo_deb) {
        eprintln!("xtask: installing cargo-deb {}", pins.cargo_deb);
        run(cargo().args(["install", "--locked", "cargo-deb", "--version", &pins.cargo_deb]))?;
    }
    let started = Instant::now();
    let out = cargo()
        .args(["deb", "--package", "leakmon"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("start cargo deb")?;
    if !out.status.success() {
        bail!("cargo deb failed");
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| Path::new(l.trim()).extension().is_some_and(|e| e == "deb"))
        .map(|l| PathBuf::from(l.trim()))
        .context("cargo deb printed no package path")?;
    eprintln!("xtask: built {} in {:.0?}", path.display(), started.elapsed());
    Ok(path)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn pins() -> Result<Pins> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let get = |key: &str| -> Result<String> {
        metadata.workspace_metadata["leakmon"][key]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("[workspace.metadata.leakmon] {key} is missing"))
    };
    Ok(Pins {
        host_toolchain: get("host-toolchain")?,
        toolchain: get("ebpf-toolchain")?,
        bpf_linker: get("bpf-linker")?,
        llvm: get("llvm-major")?,
        cargo_deb: get("cargo-deb")?,
        grafana_schema: get("grafana-schema")?,
        typescript: get("typescript")?,
    })
}

fn cargo_bin() -> PathBuf {
    env::var_os("CARGO_HOME").map_or_else(|| home().join(".cargo"), PathBuf::from).join("bin")
}

fn home() -> PathBuf {
    env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// PATH with cargo's bin directory first, where bpf-linker is installed.
fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![cargo_bin()];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).expect("valid PATH")
}

/// cargo through rustup's proxy, so that `RUSTUP_TOOLCHAIN` picks the pinned toolchain
/// (`$CARGO` is the cargo of whichever toolchain built xtask).
fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env("PATH", path_with_cargo_bin());
    cmd
}

/// The tree is formatted and clean under clippy's default lints, warnings denied (the
/// pedantic set the workspace turns on stays advice, for editors).
fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--all-targets",
        "--features",
        "leakmon/failpoints",
        "--",
        "-A",
        "clippy::pedantic",
        "-D",
        "warnings",
    ]))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// What `cargo test` said, added up over its result lines.
struct Outcome {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs `cargo test`, passing its output through, and adds up its result lines.
fn run_tests(cmd: &mut Command) -> Result<Outcome> {
    use std::io::{BufRead as _, BufReader};
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("start {cmd:?}"))?;
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.context("read cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(Outcome { passed, failed, ignored })
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{why}: run as root");
    }
    Ok(())
}

fn setup(pins: &Pins, tests: bool) -> Result<()> {
    let llvm = &pins.llvm;
    let mut packages = vec![
        format!("llvm-{llvm}-dev"),
        format!("libpolly-{llvm}-dev"),
        "zlib1g-dev".to_owned(),
        "libzstd-dev".to_owned(),
        "gcc".to_owned(),
    ];
    if tests {
        packages.extend(
            [
                "g++",
                "valgrind",
                "bpftool",
                "prometheus",
                "python3",
                "python3-pip",
                "systemd",
                "golang-go",
                // Allocators other than glibc's, and a server that links one.
                "musl-tools",
                "libjemalloc2",
                // jemalloc built into a program's executable (inline hooks).
                "libjemalloc-dev",
                "libtcmalloc-minimal4",
                "libmimalloc2.0",
                "redis-server",
                "redis-tools",
                // The trend tests' Node.js workload.
                "nodejs",
                // The JVM tests' fixture: javac, and jcmd to check what leakmon left.
                "openjdk-17-jdk-headless",
                // The signals test turns swap on in a file of its own.
                "util-linux",
                // The seccomp test traces the calls a load makes.
                "bpftrace",
                // Real containers (their images are built here, never pulled).
                "podman",
                "runc",
            ]
            .map(str::to_owned),
        );
    }
    apt_install(&packages)?;
    if tests && output(Command::new("npm").arg("--version")).is_none() {
        // NodeSource's nodejs carries npm; Debian's wants its own package (which
        // conflicts with NodeSource's, hence only when npm is missing).
        apt_install(&["npm".to_owned()])?;
    }
    if tests {
        pip_install("kubernetes_validate", "kubernetes-validate")?;
        npm_install(
            Path::new("target/grafana-schema"),
            &[format!("typescript@{}", pins.typescript), format!("@grafana/schema@{}", pins.grafana_schema)],
        )?;
    }

    rust_toolchains(pins)?;
    bpf_linker(pins)
}

/// The pinned host toolchain, with clippy and rustfmt (the tests' lint step), and the
/// pinned nightly with rust-src for the eBPF side.
fn rust_toolchains(pins: &Pins) -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with(&pins.host_toolchain)) {
        eprintln!("xtask: installing Rust {}", pins.host_toolchain);
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &pins.host_toolchain,
            "--profile",
            "minimal",
            "--component",
            "clippy,rustfmt",
        ]))?;
    }
    if !toolchains.lines().any(|l| l.starts_with(&pins.toolchain)) {
        eprintln!("xtask: installing Rust {} with rust-src", pins.toolchain);
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &pins.toolchain,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    for (toolchain, component) in
        [(&pins.toolchain, "rust-src"), (&pins.host_toolchain, "clippy"), (&pins.host_toolchain, "rustfmt")]
    {
        let installed = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))
        .unwrap_or_default();
        if !installed.lines().any(|l| l.starts_with(component)) {
            run(Command::new("rustup").args(["component", "add", component, "--toolchain", toolchain]))?;
        }
    }

    Ok(())
}

/// bpf-linker at its pinned version, built against Debian's LLVM.
fn bpf_linker(pins: &Pins) -> Result<()> {
    let llvm = &pins.llvm;
    let linker = cargo_bin().join("bpf-linker");
    let have = output(Command::new(&linker).arg("--version")).unwrap_or_default();
    if !have.split_whitespace().any(|w| w == pins.bpf_linker) {
        eprintln!("xtask: building bpf-linker {} against LLVM {llvm}", pins.bpf_linker);
        let llvm_prefix = format!("/usr/lib/llvm-{llvm}");
        let mut path = vec![PathBuf::from(&llvm_prefix).join("bin")];
        path.extend(env::split_paths(&path_with_cargo_bin()));
        run(cargo()
            .env("PATH", env::join_paths(path)?)
            .env(format!("LLVM_SYS_{llvm}1_PREFIX"), &llvm_prefix)
            .args([
                "install",
                "bpf-linker",
                "--version",
                &pins.bpf_linker,
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm}"),
            ]))?;
    }
    Ok(())
}

/// Node packages the tests use, into `dir`, unless a previous run put them there.
fn npm_install(dir: &Path, packages: &[String]) -> Result<()> {
    let stamp = dir.join(".installed");
    let want = packages.join(" ");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    eprintln!("xtask: installing {want} from npm");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    run(Command::new("npm")
        .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
        .arg(dir)
        .args(packages))?;
    std::fs::write(&stamp, want).with_context(|| format!("write {}", stamp.display()))
}

/// A Python tool the tests use, from `PyPI`, unless it is already importable.
fn pip_install(module: &str, package: &str) -> Result<()> {
    if output(Command::new("python3").args(["-c", &format!("import {module}")])).is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing {package} from PyPI");
    let pip = || {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "pip", "install", "--quiet", package]);
        cmd
    };
    // Debian's own python3 marks itself externally managed; a tool for tests may go in.
    if output(&mut pip()).is_some() {
        return Ok(());
    }
    run(pip().arg("--break-system-packages"))
}

fn apt_install(packages: &[String]) -> Result<()> {
    let missing: Vec<&String> = packages
        .iter()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p.as_str()]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing Debian packages: {}",
        missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
    );
    require_root("installing Debian packages")?;
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing))
}

fn build(release: bool) -> Result<()> {
    let started = Instant::now();
    let mut cmd = cargo();
    cmd.args(["build", "--package", "leakmon"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    eprintln!("xtask: built target/{profile}/leakmon in {:.0?}", started.elapsed());
    Ok(())
}
