//! Keeping the kernel's unwind tables, and the layouts the runtimes' frame walkers
//! read (see [`crate::runtimes::Walked`]), in step with the traced processes'
//! mappings.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Probes {
    /// Gives the kernel unwind tables for the executable mappings of `pid` (`maps`, read
    /// now; paths opened through `root`, its `/proc/PID/root`), so its stacks are walked
    /// through `.eh_frame` instead of frame pointers. Each file's rows are built and
    /// stored once; a process whose mappings did not change since its last refresh
    /// costs nothing. Returns the mappings with tables.
    pub fn unwind_process(&mut self, pid: u32, maps: &[Mapping], root: &Path) -> Result<usize, ProbeError> {
        if self.unwind.capacity == 0 {
            return Ok(0);
        }
        let exec: Vec<&Mapping> = maps.iter().filter(|m| m.executable && m.inode != 0).collect();
        let signature: Vec<_> =
            exec.iter().map(|m| (m.start, m.end, (m.dev_major, m.dev_minor, m.inode))).collect();
        if self.unwind.processes.get(&pid) == Some(&signature) {
            return Ok(0);
        }
        let mut entry = match self.unwind_entry(&exec, root)? {
            Some(entry) => entry,
            // The rows are full. Most of them may belong to files no live process maps
            // any more: start over (every process falls back to frame pointers until
            // its next refresh gives it tables again), at most once per interval.
            None if self.unwind.may_compact() => {
                self.reset_unwind()?;
                self.unwind_entry(&exec, root)?.unwrap_or_else(|| self.partial_entry(&exec))
            }
            None => self.partial_entry(&exec),
        };
        entry.gen = self.unwind.next_gen();
        let with_tables = entry.count as usize;
        let mut procs: HashMap<&mut MapData, u32, ProcUnwind> =
            HashMap::try_from(self.ebpf.map_mut("UNWIND_PROCS").ok_or_else(|| missing_map("UNWIND_PROCS"))?)
                .map_err(map_err("open", "UNWIND_PROCS"))?;
        procs.insert(&pid, &entry, 0).map_err(map_err("insert", "UNWIND_PROCS"))?;
        self.unwind.processes.insert(pid, signature);
        Ok(with_tables)
    }

    /// The kernel entry for these mappings, storing the rows of files not stored yet;
    /// `None` when a file's rows do not fit.
    pub(super) fn unwind_entry(
        &mut self,
        exec: &[&Mapping],
        root: &Path,
    ) -> Result<Option<ProcUnwind>, ProbeError> {
        for m in exec.iter().take(MAX_MAPPINGS) {
            let file = (m.dev_major, m.dev_minor, m.inode);
            if self.unwind.files.contains_key(&file) {
                continue;
            }
            let path = m.open_path(root);
            match self.store_rows(&path)? {
                Stored::Rows(stored) => self.unwind.files.insert(file, Some(stored)),
                Stored::NoTables => self.unwind.files.insert(file, None),
                Stored::Full => return Ok(None),
            };
        }
        Ok(Some(self.partial_entry(exec)))
    }

    /// The kernel entry for the mappings whose files have rows stored.
    pub(super) fn partial_entry(&self, exec: &[&Mapping]) -> ProcUnwind {
        let mut entry = ProcUnwind::default();
        for m in exec.iter().take(MAX_MAPPINGS) {
            let Some(Some(stored)) = self.unwind.files.get(&(m.dev_major, m.dev_minor, m.inode)) else {
                continue;
            };
            let table = unwind::FileTable { rows: Vec::new(), segments: stored.segments.clone() };
            let Some(bias) = table.bias(m.start, m.offset) else { continue };
            entry.mappings[entry.count as usize] = UnwindMapping {
                start: m.start,
                end: m.end,
                bias,
                first_row: stored.first_row,
                rows: stored.rows,
            };
            entry.count += 1;
        }
        entry
    }

    /// Forgets every file's rows and every process's tables, in the kernel too.
    pub(super) fn reset_unwind(&mut self) -> Result<(), ProbeError> {
        let mut procs: HashMap<&mut MapData, u32, ProcUnwind> =
            HashMap::try_from(self.ebpf.map_mut("UNWIND_PROCS").ok_or_else(|| missing_map("UNWIND_PROCS"))?)
                .map_err(map_err("open", "UNWIND_PROCS"))?;
        let pids: Vec<u32> = procs.keys().filter_map(Result::ok).collect();
        for pid in pids {
            let _ = procs.remove(&pid);
        }
        info!(
            rows = self.unwind.rows_used(),
            files = self.unwind.files.len(),
            "unwind tables full: starting over with the files live processes map"
        );
        self.unwind.reset();
        Ok(())
    }

    /// Builds and stores one file's rows.
    pub(super) fn store_rows(&mut self, path: &Path) -> Result<Stored, ProbeError> {
        let table = match unwind::file_table(path) {
            Ok(table) => table,
            Err(e) => {
                debug!("no unwind tables: {e}");
                return Ok(Stored::NoTables);
            }
        };
        let Some(first_row) = self.unwind.reserve(table.rows.len()) else {
            if !std::mem::replace(&mut self.unwind.warned_full, true) {
                warn!(
                    file = %path.display(),
                    rows = table.rows.len(),
                    capacity = self.unwind.capacity,
                    "the unwind-row table is full: stacks stop at files that do not fit (raise unwind-rows)"
                );
            }
            return Ok(Stored::Full);
        };
        let mut rows: Array<&mut MapData, Row> =
            Array::try_from(self.ebpf.map_mut("UNWIND_ROWS").ok_or_else(|| missing_map("UNWIND_ROWS"))?)
                .map_err(map_err("open", "UNWIND_ROWS"))?;
        for (i, row) in table.rows.iter().enumerate() {
            rows.set(first_row + i as u32, row, 0).map_err(map_err("write", "UNWIND_ROWS"))?;
        }
        debug!(file = %path.display(), rows = table.rows.len(), "unwind tables stored");
        Ok(Stored::Rows(unwind::Stored {
            first_row,
            rows: table.rows.len() as u32,
            segments: table.segments,
        }))
    }

    /// Processes whose stacks reached code their tables do not cover, since the last
    /// call; refresh them with [`Probes::unwind_process`].
    pub fn unwind_stale(&mut self) -> Vec<u32> {
        let Some(map) = self.ebpf.map_mut("UNWIND_STALE") else { return Vec::new() };
        let Ok(mut stale) = HashMap::<&mut MapData, u32, u32>::try_from(map) else { return Vec::new() };
        let pids: Vec<u32> = stale.keys().filter_map(Result::ok).collect();
        for pid in &pids {
            let _ = stale.remove(pid);
        }
        pids
    }

    /// Unwind-table rows in use and their capacity.
    pub fn unwind_rows(&self) -> (u32, u32) {
        (self.unwind.rows_used(), self.unwind.capacity)
    }

    /// Processes given unwind tables (and not forgotten since).
    pub fn unwind_processes(&self) -> usize {
        self.unwind.processes.len()
    }

    /// Whether `pid` has unwind tables from an earlier [`Probes::unwind_process`].
    pub fn has_unwind(&self, pid: u32) -> bool {
        self.unwind.processes.contains_key(&pid)
    }

    /// Whether the kernel walks a runtime's frames in `pid` as last decided (see
    /// [`crate::runtimes::Walked`]); `None` when not decided, or when the file it was
    /// decided for is no longer mapped in `maps`.
    pub fn walks(&self, pid: u32, maps: &[Mapping]) -> Option<bool> {
        let walk = self.walked.get(&pid)?;
        let mapped = maps.iter().any(|m| m.executable && m.inode == walk.inode);
        (walk.table.is_none() || mapped).then_some(walk.table.is_some())
    }

    /// The kernel's walker whose layouts are in `table` walks `pid` with `layout`, read
    /// from the file with `inode`.
    pub fn walk<V: aya::Pod>(
        &mut self,
        pid: u32,
        table: &'static str,
        layout: &V,
        inode: u64,
    ) -> Result<(), ProbeError> {
        let mut layouts: HashMap<&mut MapData, u32, V> =
            HashMap::try_from(self.ebpf.map_mut(table).ok_or_else(|| missing_map(table))?)
                .map_err(map_err("open", table))?;
        layouts.insert(&pid, layout, 0).map_err(map_err("insert", table))?;
        self.walked.insert(pid, Walk { inode, table: Some((table, forget_layout::<V>)) });
        Ok(())
    }

    /// `pid` runs a runtime whose frames the kernel does not walk (a version not
    /// known): not looked at again while its image stays.
    pub fn walk_none(&mut self, pid: u32) {
        self.walked.insert(pid, Walk { inode: 0, table: None });
    }

    /// Drops `pid`'s unwind tables (its image was replaced, or it is gone).
    pub fn forget_unwind(&mut self, pid: u32) {
        if let Some(Walk { table: Some((table, forget)), .. }) = self.walked.remove(&pid) {
            forget(&mut self.ebpf, table, pid);
        }
        self.unwind.processes.remove(&pid);
        if let Some(map) = self.ebpf.map_mut("UNWIND_PROCS") {
            if let Ok(mut procs) = HashMap::<&mut MapData, u32, ProcUnwind>::try_from(map) {
                let _ = procs.remove(&pid);
            }
        }
    }
}

/// A runtime walker's decision for a process: the file it was made for, and the table
/// its layout went into, with how to take it out (the table's value type is the
/// runtime's).
pub(super) struct Walk {
    inode: u64,
    table: Option<(&'static str, Forget)>,
}

/// Takes a process's layout out of a walker's table.
type Forget = fn(&mut Ebpf, &str, u32);

fn forget_layout<V: aya::Pod>(ebpf: &mut Ebpf, table: &str, pid: u32) {
    if let Some(map) = ebpf.map_mut(table) {
        if let Ok(mut layouts) = HashMap::<&mut MapData, u32, V>::try_from(map) {
            let _ = layouts.remove(&pid);
        }
    }
}
