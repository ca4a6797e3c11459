//! Which container a process runs in, read from its cgroup path: the runtime's name
//! and the container's id, and on Kubernetes the pod's UID. Each runtime names its
//! cgroups its own way, under systemd's cgroup driver (`.scope` and `.slice` units) or
//! the plain cgroupfs one, on cgroup v1 and v2 alike:
//!
//! | runtime | systemd driver | cgroupfs driver |
//! | --- | --- | --- |
//! | podman | `machine.slice/libpod-ID.scope` | `libpod_parent/libpod-ID` |
//! | Docker | `system.slice/docker-ID.scope` | `docker/ID` |
//! | containerd (Kubernetes) | `kubepods-…-podUID.slice/cri-containerd-ID.scope` | `kubepods/…/podUID/ID` |
//! | CRI-O (Kubernetes) | `kubepods-…-podUID.slice/crio-ID.scope` | `kubepods/…/podUID/crio-ID` |
//!
//! A Kubernetes pod's name and namespace are not on the path (its UID is): they are
//! the API server's to give, and a Prometheus join on `pod_uid` with kube-state-metrics'
//! `kube_pod_info` names them.

use serde::Serialize;

/// A container, as its cgroup path names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Container {
    /// `podman`, `docker`, `containerd`, `cri-o`, or `kubernetes` (a pod's container
    /// whose runtime the path does not say).
    pub runtime: &'static str,
    /// The container's id: 64 hexadecimal digits.
    pub id: String,
    /// The Kubernetes pod's UID, where the process runs in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

/// The container of the process whose cgroup path is `path`, if it runs in one.
pub fn of_cgroup(path: &str) -> Option<Container> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let pod_uid = parts.iter().find_map(|p| pod_uid(p));
    // The innermost part that names a container: a process may sit in a sub-cgroup
    // of its container's (`libpod-ID.scope/container`).
    let (runtime, id) = parts.iter().rev().find_map(|p| container_part(p, pod_uid.is_some()))?;
    Some(Container { runtime, id: id.to_owned(), pod_uid })
}

/// A part naming a container: `PREFIX-ID[.scope]` or, for the cgroupfs drivers, a bare
/// id (Docker's `docker/ID`, a pod's `podUID/ID`).
fn container_part(part: &str, in_pod: bool) -> Option<(&'static str, &str)> {
    let unit = part.strip_suffix(".scope").unwrap_or(part);
    for (prefix, runtime) in
        [("libpod-", "podman"), ("docker-", "docker"), ("cri-containerd-", "containerd"), ("crio-", "cri-o")]
    {
        if let Some(id) = unit.strip_prefix(prefix) {
            // `libpod-conmon-ID` is podman's monitor, not the container.
            return is_id(id).then_some((runtime, id));
        }
    }
    is_id(part).then_some((if in_pod { "kubernetes" } else { "docker" }, part))
}

/// A pod's part: `podUID` (cgroupfs) or `kubepods-QOS-podUID.slice` (systemd, the
/// UID's dashes written as underscores).
fn pod_uid(part: &str) -> Option<String> {
    let slice = part.strip_suffix(".slice").unwrap_or(part);
    let uid = slice.rsplit_once("-pod").map_or_else(|| slice.strip_prefix("pod"), |(_, uid)| Some(uid))?;
    let uid = uid.replace('_', "-");
    let hex = uid.chars().filter(char::is_ascii_hexdigit).count();
    (hex == 32 && uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')).then_some(uid)
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "bbdf01ed86b1fc90cebe7dccf8c111ed095e2077c6096045a230d800942aeb13";
    const UID: &str = "0e5c9d2a-7d0b-4c6e-9a43-1f0c2b7d6e55";

    fn container(runtime: &'static str, pod: bool) -> Option<Container> {
        Some(Container { runtime, id: ID.into(), pod_uid: pod.then(|| UID.into()) })
    }

    /// The layouts of the table above, each as its runtime writes it.
    #[test]
    fn each_runtime_s_cgroup_paths_name_its_containers() {
        let uid_ = UID.replace('-', "_");
        let cases = [
            (format!("/libpod_parent/libpod-{ID}"), container("podman", false)),
            (format!("/machine.slice/libpod-{ID}.scope"), container("podman", false)),
            (format!("/machine.slice/libpod-{ID}.scope/container"), container("podman", false)),
            (format!("/system.slice/docker-{ID}.scope"), container("docker", false)),
            (format!("/docker/{ID}"), container("docker", false)),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                container("containerd", true),
            ),
            (format!("/kubepods/burstable/pod{UID}/{ID}"), container("kubernetes", true)),
            (format!("/kubepods/pod{UID}/{ID}"), container("kubernetes", true)),
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope"),
                container("cri-o", true),
            ),
            (format!("/kubepods/besteffort/pod{UID}/crio-{ID}"), container("cri-o", true)),
        ];
        for (path, expected) in cases {
            assert_eq!(of_cgroup(&path), expected, "{path}");
        }
    }

    /// Paths of no container: a service, a user's session, podman's monitor, the root.
    #[test]
    fn a_service_a_session_and_a_container_s_monitor_are_no_container() {
        for path in [
            "/",
            "/system.slice/nginx.service",
            "/user.slice/user-1000.slice/session-3.scope",
            &format!("/machine.slice/libpod-conmon-{ID}.scope"),
            "/docker/not-an-id",
        ] {
            assert_eq!(of_cgroup(path), None, "{path}");
        }
    }
}
