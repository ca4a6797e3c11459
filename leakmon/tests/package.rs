//! The Debian package (`cargo xtask deb`): its control data, and a real `dpkg`
//! install into a scratch root: the binary runs, the unit, configuration, rules and
//! dashboard are where the README says, a removal keeps the edited configuration and a
//! purge removes it.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The package `cargo xtask test` built (`LEAKMON_DEB`), or one built here with
/// cargo-deb into a target directory of its own (cargo's lock on this one is held).
fn package() -> PathBuf {
    if let Some(path) = std::env::var_os("LEAKMON_DEB") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["deb", "--package", "leakmon"])
        .env("CARGO_TARGET_DIR", workspace.join("target/deb-check"))
        .current_dir(workspace)
        .output()
        .expect("run cargo deb (`cargo xtask deb` installs it)");
    assert!(out.status.success(), "cargo deb: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().rev().find(|l| Path::new(l.trim()).extension().is_some_and(|e| e == "deb"));
    PathBuf::from(path.expect("package path").trim())
}

fn dpkg(root: &Path, args: &[&str]) -> String {
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        // The scratch root has no libc6 in its dpkg database; the host's is used.
        .args(["--force-depends", "--force-script-chrootless"])
        .args(args)
        .output()
        .expect("run dpkg");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "dpkg {args:?}: {text}");
    text
}

#[test]
fn the_package_installs_runs_and_purges() {
    let deb = package();
    let info = Command::new("dpkg-deb").arg("-I").arg(&deb).output().expect("dpkg-deb");
    let info = String::from_utf8_lossy(&info.stdout);
    for field in ["Package: leakmon", "Section: admin", "Depends: libc6", "conffiles"] {
        assert!(info.contains(field), "no {field:?} in\n{info}");
    }

    let root = tempfile::tempdir().expect("scratch root");
    let r = root.path();
    std::fs::create_dir_all(r.join("var/lib/dpkg/updates")).expect("dpkg dirs");
    std::fs::create_dir_all(r.join("var/lib/dpkg/info")).expect("dpkg dirs");
    std::fs::write(r.join("var/lib/dpkg/status"), "").expect("dpkg status");
    dpkg(r, &["-i", &deb.display().to_string()]);

    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let same = |installed: &str, source: &str| {
        let got = std::fs::read(r.join(installed)).unwrap_or_else(|e| panic!("{installed}: {e}"));
        assert_eq!(got, std::fs::read(deploy.join(source)).expect("source"), "{installed} is {source}");
    };
    same("lib/systemd/system/leakmon.service", "systemd/leakmon.service");
    same("etc/leakmon/leakmon.toml", "leakmon.toml");
    same("usr/share/leakmon/grafana/leakmon.json", "grafana/leakmon.json");
    same("usr/share/leakmon/prometheus/leakmon.rules.yml", "prometheus/leakmon.rules.yml");
    same("usr/share/leakmon/kubernetes/leakmon.yaml", "kubernetes/leakmon.yaml");
    assert!(r.join("usr/share/doc/leakmon/README.md").exists());

    // The installed binary runs and accepts the installed configuration; the installed
    // rules pass their unit tests where they are.
    let leakmon = r.join("usr/bin/leakmon");
    let version = Command::new(&leakmon).arg("--version").output().expect("run installed leakmon");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("leakmon {}", env!("CARGO_PKG_VERSION"))
    );
    let check =
        Command::new(&leakmon).args(["config", "check"]).arg(r.join("etc/leakmon/leakmon.toml")).output();
    assert!(check.expect("config check").status.success());
    let rules = Command::new("promtool")
        .args(["test", "rules", "leakmon.rules.test.yml"])
        .current_dir(r.join("usr/share/leakmon/prometheus"))
        .output()
        .expect("promtool");
    assert!(rules.status.success(), "{}", String::from_utf8_lossy(&rules.stdout));

    // An edited configuration survives removal; purge takes it.
    let config = r.join("etc/leakmon/leakmon.toml");
    std::fs::write(&config, "window = \"20m\"\n").expect("edit config");
    dpkg(r, &["-r", "leakmon"]);
    assert!(!leakmon.exists(), "binary removed");
    assert_eq!(std::fs::read_to_string(&config).expect("kept"), "window = \"20m\"\n");
    dpkg(r, &["-P", "leakmon"]);
    assert!(!config.exists(), "purge removes the configuration");
}
