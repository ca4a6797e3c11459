//! Attaching the allocator probes to files, for every process or for one, and
//! detaching them; the links kept to close them side by side.

#[allow(clippy::wildcard_imports)]
use super::*;

/// How uprobes are attached. Each allocator program exists in the object twice, as
/// `uprobe.multi` and as a perf-event uprobe (`_perf` suffix); only the kinds in use
/// are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachKind {
    /// One `uprobe_multi` link per file and program (kernel 6.6+): a file's whole
    /// set attaches in a handful of syscalls and detaches with one RCU grace period.
    Multi,
    /// One perf event per entry point; each one closed waits for a grace period.
    PerfEvent,
}

impl AttachKind {
    /// The program's name in the eBPF object for this kind.
    pub(super) fn program(self, base: &'static str) -> String {
        match self {
            Self::Multi => base.to_owned(),
            Self::PerfEvent => format!("{base}_perf"),
        }
    }
}

/// The attach kinds this kernel allows: system-wide, and for one process (early
/// `uprobe_multi` kernels filtered a pid on one thread, not the whole process).
/// `LEAKMON_PERF_UPROBES=1` takes the fallback on any kernel, for its tests.
pub(super) fn attach_kinds() -> (AttachKind, AttachKind) {
    use aya::sys::{is_uprobe_multi_supported, UProbeMultiFeature};
    let forced = std::env::var_os("LEAKMON_PERF_UPROBES").is_some_and(|v| v == "1");
    let multi = !forced && is_uprobe_multi_supported(UProbeMultiFeature::LinkCreation).unwrap_or(false);
    let scoped =
        multi && is_uprobe_multi_supported(UProbeMultiFeature::ProcessScopedPidFilter).unwrap_or(false);
    let kind = |ok: bool| if ok { AttachKind::Multi } else { AttachKind::PerfEvent };
    if !multi {
        info!("this kernel has no uprobe_multi links: attaching one perf-event uprobe per entry point");
    } else if !scoped {
        info!("this kernel's uprobe_multi links filter one thread, not a process: per-process probes use perf events");
    }
    (kind(multi), kind(scoped))
}

/// One attached program on one file: a `uprobe_multi` link holding all its entry
/// points, or the perf events standing in for one.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) program: String,
    /// Entry points it covers (0 for the shared return probe).
    pub(super) entry_points: usize,
    pub(super) id: UProbeLinkId,
}

/// The links attached for one process, and the files they cover.
#[derive(Debug, Default)]
pub(super) struct ProcessLinks {
    pub(super) files: HashSet<FileId>,
    pub(super) links: Vec<Link>,
}

/// Drops each link on a thread of its own, so that their grace periods overlap.
pub(super) fn close_side_by_side(links: Vec<aya::programs::uprobe::UProbeLink>) {
    if links.len() < 2 {
        return drop(links);
    }
    std::thread::scope(|scope| {
        for link in links {
            // A thread that cannot start leaves its link to be closed here.
            let _ = std::thread::Builder::new().spawn_scoped(scope, move || drop(link));
        }
    });
}

/// Entry points among attached links (the shared return probe is not one).
pub(super) fn entry_count(links: &[Link]) -> usize {
    links.iter().map(|l| l.entry_points).sum()
}

impl Probes {
    /// Attaches the allocator probes to one library file, for every process that maps
    /// it now or later. A file already attached (by any path) is skipped. Returns the
    /// number of entry points probed.
    pub fn attach_library(&mut self, path: &Path) -> Result<usize, ProbeError> {
        let meta =
            std::fs::metadata(path).map_err(|source| ProbeError::Stat { path: path.to_owned(), source })?;
        let id = FileId { dev: meta.dev(), ino: meta.ino() };
        if self.attached.contains(&id) {
            return Ok(0);
        }
        let points = entry_points(path)?;
        let links = self.attach_points(path, &points, UProbeScope::AllProcesses, self.system_kind)?;
        let entry_points = entry_count(&links);
        self.system_links.extend(links);
        self.attached.insert(id);
        info!(library = %path.display(), entry_points, "allocator probes attached");
        Ok(entry_points)
    }

    /// Attaches the allocator probes to `libraries` for `pid` alone (the kernel puts
    /// breakpoints in that process only, so no other process pays for them) and starts
    /// tracing it. Files already attached for `pid` are skipped, so a caller may pass
    /// a process's whole list again as it loads more. Returns the number of entry
    /// points probed by this call.
    pub fn attach_process(&mut self, pid: u32, libraries: &[PathBuf]) -> Result<usize, ProbeError> {
        let Some(nz) = NonZeroU32::new(pid) else { return Ok(0) };
        let mut entry_points = 0;
        let mut added = Vec::new();
        for path in libraries {
            let Ok(meta) = std::fs::metadata(path) else { continue };
            let id = FileId { dev: meta.dev(), ino: meta.ino() };
            if self.per_process.get(&pid).is_some_and(|p| p.files.contains(&id)) {
                continue;
            }
            let points = match self::targets::entry_points(path) {
                Ok(points) => points,
                Err(e) => {
                    let links = added.into_iter().flat_map(|(_, links)| links).collect();
                    let _ = self.detach_links(links);
                    return Err(e.into());
                }
            };
            match self.attach_points(path, &points, UProbeScope::OneProcess(nz), self.process_kind) {
                Ok(links) => {
                    entry_points += entry_count(&links);
                    added.push((id, links));
                }
                Err(e) => {
                    // Not half a set: drop what this call attached too (what earlier
                    // calls attached, and what they counted, stays).
                    let links = added.into_iter().flat_map(|(_, links)| links).collect();
                    let _ = self.detach_links(links);
                    return Err(e);
                }
            }
        }
        let process = self.per_process.entry(pid).or_default();
        for (id, links) in added {
            process.files.insert(id);
            process.links.extend(links);
        }
        self.trace(pid)?;
        Ok(entry_points)
    }

    /// Attaches to each allocator file of `libraries` for every process; a file gone
    /// meanwhile is skipped (worth no stop). Returns the number of files newly attached.
    pub fn attach_libraries(
        &mut self,
        libraries: impl IntoIterator<Item = PathBuf>,
    ) -> Result<usize, ProbeError> {
        let mut attached = 0;
        for lib in libraries {
            match self.attach_library(&lib) {
                Ok(n) => attached += usize::from(n > 0),
                Err(ProbeError::Stat { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(attached)
    }

    /// Attaches to the in-process agent's markers in the agent files at `paths` (see
    /// `agent::files`): for `pid` alone, or for every process that maps one (a command's
    /// tree, which preloads it). The agent samples in-process, so the kernel side records
    /// every marker hit at the weight the agent passes. Returns the number of markers
    /// probed.
    pub fn attach_agent(&mut self, pid: Option<u32>, paths: &[PathBuf]) -> Result<usize, ProbeError> {
        let mut probed = 0;
        for path in paths {
            probed += self.attach_agent_file(pid, path)?;
        }
        Ok(probed)
    }

    pub(super) fn attach_agent_file(&mut self, pid: Option<u32>, path: &Path) -> Result<usize, ProbeError> {
        let meta =
            std::fs::metadata(path).map_err(|source| ProbeError::Stat { path: path.to_owned(), source })?;
        let id = FileId { dev: meta.dev(), ino: meta.ino() };
        let points = agent_points(path)?;
        match pid.and_then(NonZeroU32::new) {
            Some(nz) => {
                let pid = nz.get();
                if self.per_process.get(&pid).is_some_and(|p| p.files.contains(&id)) {
                    return Ok(0);
                }
                let links =
                    self.attach_points(path, &points, UProbeScope::OneProcess(nz), self.process_kind)?;
                let process = self.per_process.entry(pid).or_default();
                process.files.insert(id);
                process.links.extend(links);
                self.trace(pid)?;
            }
            None => {
                if !self.attached.insert(id) {
                    return Ok(0);
                }
                let links =
                    match self.attach_points(path, &points, UProbeScope::AllProcesses, self.system_kind) {
                        Ok(links) => links,
                        Err(e) => {
                            self.attached.remove(&id);
                            return Err(e);
                        }
                    };
                self.system_links.extend(links);
            }
        }
        Ok(points.len())
    }

    /// Attaches every allocator entry point of `path`: per program, one link holding
    /// all its entry points. The shared return probe goes first and leaves last, so no
    /// entry can be recorded without its return probe in place (an entry without its
    /// return would stay in flight). On a failure, what this call attached is detached.
    pub(super) fn attach_points(
        &mut self,
        path: &Path,
        points: &[EntryPoint],
        scope: UProbeScope,
        kind: AttachKind,
    ) -> Result<Vec<Link>, ProbeError> {
        for point in points {
            // The bench reads these to put its same-traps floor where leakmon probes.
            debug!(
                library = %path.display(),
                symbol = point.symbol,
                offset = point.file_offset,
                probe_offset = point.probe_offset,
                "entry point"
            );
        }
        // The return probe must be at the first byte, where the return address is on top
        // of the stack; an entry probe may sit a little further (see `placement`).
        let mut groups: Vec<(&'static str, Vec<u64>)> = vec![(
            RETURN_PROGRAM,
            points.iter().filter(|p| p.handler.needs_return()).map(|p| p.file_offset).collect(),
        )];
        for handler in ENTRY_PROGRAMS {
            let offsets: Vec<u64> =
                points.iter().filter(|p| p.handler == handler).map(|p| p.probe_offset).collect();
            groups.push((handler.program(), offsets));
        }
        let mut links = Vec::new();
        for (base, offsets) in groups {
            if offsets.is_empty() {
                continue;
            }
            let program = kind.program(base);
            let locations = offsets.iter().map(|&o| UProbeAttachLocation::AbsoluteOffset(o));
            let attached = uprobe(&mut self.ebpf, &program)
                .and_then(|p| p.attach(locations, path, scope).map_err(prog_err("attach", &program)));
            match attached {
                Ok(id) => {
                    let entry_points = if base == RETURN_PROGRAM { 0 } else { offsets.len() };
                    links.push(Link { program, entry_points, id });
                }
                Err(e) => {
                    let _ = self.detach_links(links);
                    return Err(e);
                }
            }
        }
        debug!(library = %path.display(), entry_points = points.len(), ?kind, "probes attached");
        Ok(links)
    }

    /// Closes `links`: entry probes before the return probe they share. Each close
    /// waits for an RCU grace period, and waits that overlap share one, so the links
    /// of each round are closed side by side (one after another, a redis-server's 27
    /// links took 1.2 s).
    pub(super) fn detach_links(&mut self, links: Vec<Link>) -> Result<(), ProbeError> {
        let mut first_error = None;
        // The shared return probe is the link that covers no entry point.
        let (returns, entries): (Vec<Link>, Vec<Link>) = links.into_iter().partition(|l| l.entry_points == 0);
        for round in [entries, returns] {
            let mut taken = Vec::with_capacity(round.len());
            for link in round {
                match uprobe(&mut self.ebpf, &link.program)
                    .and_then(|p| p.take_link(link.id).map_err(prog_err("detach", &link.program)))
                {
                    Ok(owned) => taken.push(owned),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            close_side_by_side(taken);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Detaches the probes attached for `pid` alone and drops everything traced for it.
    pub fn detach_process(&mut self, pid: u32) -> Result<(), ProbeError> {
        let links = self.per_process.remove(&pid).unwrap_or_default().links;
        self.detach_links(links)?;
        self.purge(|tgid, _| tgid == pid, |tgid, _| tgid == pid)?;
        Ok(())
    }

    /// Processes with probes of their own.
    pub fn processes_attached(&self) -> impl Iterator<Item = u32> + '_ {
        self.per_process.keys().copied()
    }

    /// Number of library files attached, system-wide or for some process.
    pub fn attached_files(&self) -> usize {
        let per_process = self.per_process.values().flat_map(|p| &p.files);
        self.attached.iter().chain(per_process).collect::<HashSet<_>>().len()
    }
}
