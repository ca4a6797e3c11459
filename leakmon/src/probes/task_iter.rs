//! Every process's memory counters in one pass: the `leakmon-tasks` object's walk over
//! the kernel's list of processes (see `leakmon_common::task_memory`), read once a tick.
//!
//! The program is a task iterator whose link visits one task, the daemon's own; from
//! there it walks the whole list and writes a record a process into an array this side
//! has mapped, then one [`PassSummary`] to the iterator's file. aya 0.16 turns an
//! iterator's link into one readable file and consumes the link doing it
//! (`IterLink::into_file`), and takes no iterator options: a pass a second needs a new
//! file from the same link each time, so the link and the files are made with the raw
//! calls (`BPF_LINK_CREATE` with a task filter, `BPF_ITER_CREATE`), small enough to
//! upstream as `IterLink::create_file(&self)` and an options argument.

use std::{
    io::Read as _,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::Map,
    programs::{Iter, ProgramFd},
    Btf, Ebpf, EbpfLoader,
};
use leakmon_common::task_memory::{
    PassSummary, TaskLayout, TaskMemory, COUNTERS, LAYOUT_GLOBAL, MAX_CPUS, PROGRAM, RECORDS_MAP,
};

use super::kernel_btf::KernelBtf;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leakmon-tasks"));

/// bpf(2) commands and the iterator's attach type.
const LINK_CREATE: libc::c_long = 28;
const ITER_CREATE: libc::c_long = 33;
const TRACE_ITER: u32 = 28;

/// Records the map holds at least, and how much room it gets over the processes a
/// pass saw: growing means loading the program again.
const MIN_CAPACITY: u32 = 4096;
const HEADROOM: u32 = 2;

/// The loaded walk; each [`TaskIter::pass`] is one walk over the kernel's processes.
pub struct TaskIter {
    records_map: Mapped,
    capacity: u32,
    link: OwnedFd,
    // Kept for the program's and maps' lifetime; dropped after the mapping and link.
    _ebpf: Ebpf,
    records: Vec<TaskMemory>,
}

impl TaskIter {
    /// Loads the walk with the running kernel's offsets; an error says in one line what
    /// this kernel lacks.
    pub fn load() -> Result<Self> {
        Self::load_with(capacity_for(tasks_now().unwrap_or(0)))
    }

    fn load_with(capacity: u32) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!("leakmon was built without its eBPF objects");
        }
        let layout = layout(&KernelBtf::from_sys_fs().context("read the kernel's BTF")?, possible_cpus()?)?;
        // One parse of aya's serves the loader and the program (the loader would make
        // its own otherwise).
        let btf = Btf::from_sys_fs().context("read the kernel's BTF")?;
        let mut ebpf = EbpfLoader::new()
            .btf(&btf)
            .override_global(LAYOUT_GLOBAL, &layout, true)
            .map_max_entries(RECORDS_MAP, capacity)
            .load(OBJECT)
            .context("load the process walk's object")?;
        let program: &mut Iter = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("the process walk has no program {PROGRAM}"))?
            .try_into()?;
        program.load("task", &btf).context("load the process walk (Linux 6.2+ with BTF)")?;
        let link = link_create(program.fd()?, std::process::id())?;
        let Some(Map::Array(records)) = ebpf.map(RECORDS_MAP) else {
            bail!("the process walk has no array {RECORDS_MAP}");
        };
        let records_map =
            Mapped::new(records.fd().as_fd(), capacity as usize * std::mem::size_of::<TaskMemory>())
                .context("map the process walk's records")?;
        Ok(Self { records_map, capacity, link, _ebpf: ebpf, records: Vec::new() })
    }

    /// One record per process with memory of its own, in pid order.
    pub fn pass(&mut self) -> Result<&mut [TaskMemory]> {
        let mut summary = self.walk()?;
        if summary.seen > summary.written {
            // More processes than room: made once, and the pass walked again.
            *self = Self::load_with(capacity_for(summary.seen))?;
            summary = self.walk()?;
        }
        if summary.complete == 0 {
            bail!("the process walk stopped before the end of the kernel's list");
        }
        if summary.written > self.capacity || summary.seen > summary.written {
            bail!("the process walk wrote {} of {} processes", summary.written, summary.seen);
        }
        self.records.clear();
        self.records.extend((0..summary.written as usize).map(|i| self.records_map.record(i)));
        // The list is in order of creation: pid order but where pids wrapped, runs a
        // stable sort merges in one go.
        self.records.sort_by_key(|r| r.pid);
        Ok(&mut self.records)
    }

    /// Runs the program once: the records land in the map, the summary in the file.
    fn walk(&self) -> Result<PassSummary> {
        let mut attr = [0u32; 2];
        attr[0] = self.link.as_raw_fd() as u32;
        // SAFETY: `attr` is the `iter_create` member of `union bpf_attr`.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, ITER_CREATE, attr.as_mut_ptr(), 8u32) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("start a pass of the process walk");
        }
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        let mut bytes = Vec::with_capacity(std::mem::size_of::<PassSummary>());
        file.read_to_end(&mut bytes).context("read the process walk")?;
        if bytes.len() != std::mem::size_of::<PassSummary>() {
            bail!("the process walk wrote {} bytes, not its summary", bytes.len());
        }
        // SAFETY: a whole summary, a Pod type.
        Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<PassSummary>()) })
    }
}

/// The records array, mapped read-only.
struct Mapped {
    at: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: a read-only mapping owned by one `TaskIter`; nothing in it is tied to a thread.
unsafe impl Send for Mapped {}

impl Mapped {
    fn new(fd: std::os::fd::BorrowedFd<'_>, bytes: usize) -> Result<Self> {
        let len = bytes.max(1);
        // SAFETY: a new shared read-only mapping of an mmapable map; nothing else aliases it.
        let at = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        let at = std::ptr::NonNull::new(at.cast::<u8>()).ok_or_else(|| anyhow!("mmap returned NULL"))?;
        Ok(Self { at, len })
    }

    fn record(&self, i: usize) -> TaskMemory {
        let size = std::mem::size_of::<TaskMemory>();
        assert!((i + 1) * size <= self.len, "record {i} past the mapping");
        // SAFETY: in bounds (checked above); the program has finished writing (its pass
        // returned), and any bytes are a valid `TaskMemory`.
        unsafe { std::ptr::read_unaligned(self.at.as_ptr().add(i * size).cast::<TaskMemory>()) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.at.as_ptr().cast(), self.len) };
    }
}

/// Room for `seen` processes and as many again.
fn capacity_for(seen: u32) -> u32 {
    seen.saturating_mul(HEADROOM).max(MIN_CAPACITY).next_power_of_two()
}

/// Every task on the host now (threads included, so never fewer than the processes):
/// the last figure of `/proc/loadavg`'s fourth field.
fn tasks_now() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().nth(3)?.split('/').nth(1)?.parse().ok()
}

/// A link that runs the program over one task, `tid` (the walk starts from there).
fn link_create(program: &ProgramFd, tid: u32) -> Result<OwnedFd> {
    // `bpf_iter_link_info`: its `task` member, the tid first; 16 bytes, the union's size.
    let mut info = [0u32; 4];
    info[0] = tid;
    // The `link_create` member of `union bpf_attr`: program, target, attach type,
    // flags, then the iterator's options and their size.
    let mut attr = [0u64; 4];
    attr[0] = u64::from(program.as_fd().as_raw_fd() as u32);
    attr[1] = u64::from(TRACE_ITER);
    attr[2] = info.as_mut_ptr() as u64;
    attr[3] = std::mem::size_of_val(&info) as u64;
    // SAFETY: `attr` is large enough for the member; it and `info` outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, LINK_CREATE, attr.as_mut_ptr(), 32u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("attach the process walk");
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `nr_cpu_ids`: one past the highest possible CPU.
fn possible_cpus() -> Result<u32> {
    let text =
        std::fs::read_to_string("/sys/devices/system/cpu/possible").context("read the possible CPUs")?;
    let last = text
        .trim()
        .rsplit([',', '-'])
        .next()
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| anyhow!("unreadable list of possible CPUs: {:?}", text.trim()))?;
    Ok(last + 1)
}

/// The offsets the iterator reads at, from the kernel's BTF.
pub fn layout(btf: &KernelBtf, cpus: u32) -> Result<TaskLayout> {
    let at = |name: &str, member: &str| {
        btf.offset_of(name, member).ok_or_else(|| anyhow!("this kernel's {name} has no {member}"))
    };
    let pid = at("task_struct", "pid")?.offset;
    if at("task_struct", "tgid")?.offset != pid + 4 {
        bail!("this kernel's task_struct does not keep tgid beside pid");
    }
    let rss = at("mm_struct", "rss_stat")?;
    let (_, counters) =
        btf.array_of(rss.type_id).filter(|(e, _)| btf.struct_name(*e) == Some("percpu_counter")).ok_or_else(
            || anyhow!("this kernel keeps mm_struct's rss_stat without per-CPU counters (before 6.2)"),
        )?;
    if cpus as usize > MAX_CPUS {
        bail!("{cpus} possible CPUs, more than the task iterator sums ({MAX_CPUS})");
    }
    let mut counter = [0u32; COUNTERS];
    for (slot, name) in
        counter.iter_mut().zip(["MM_FILEPAGES", "MM_ANONPAGES", "MM_SWAPENTS", "MM_SHMEMPAGES"])
    {
        let value = btf.enumerator(name).ok_or_else(|| anyhow!("this kernel has no {name}"))?;
        *slot = u32::try_from(value)
            .ok()
            .filter(|v| *v < counters)
            .ok_or_else(|| anyhow!("{name} is {value}"))?;
    }
    Ok(TaskLayout {
        task_pid: pid,
        task_tasks: at("task_struct", "tasks")?.offset,
        task_mm: at("task_struct", "mm")?.offset,
        task_start_boottime: at("task_struct", "start_boottime")?.offset,
        task_comm: at("task_struct", "comm")?.offset,
        task_cgroups: at("task_struct", "cgroups")?.offset,
        mm_rss_stat: rss.offset,
        counter_size: btf.size_of("percpu_counter").ok_or_else(|| anyhow!("no percpu_counter"))?,
        counter_count: at("percpu_counter", "count")?.offset,
        counter_counters: at("percpu_counter", "counters")?.offset,
        array_pptrs: at("bpf_array", "pptrs")?.offset,
        cpus,
        counter,
    })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use leakmon_common::task_memory::page;

    use super::*;

    fn status_pages(pid: u32, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        crate::procfs::status_kib(&status, key).expect(key) / 4
    }

    /// A host with more processes than the map has room for: the pass makes room
    /// and still gives every one, the map's first records included only once.
    #[test]
    fn more_processes_than_room_grows_the_map_and_loses_none() {
        let mut children: Vec<std::process::Child> =
            (0..40).map(|_| Command::new("sleep").arg("30").spawn().expect("sleep")).collect();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut iter = TaskIter::load_with(8).expect("load the process walk");
        assert_eq!(iter.capacity, 8);
        let records = iter.pass().expect("a pass").to_vec();
        assert!(iter.capacity >= MIN_CAPACITY, "capacity {}", iter.capacity);
        for c in &children {
            assert_eq!(records.iter().filter(|r| r.pid == c.id()).count(), 1, "child {}", c.id());
        }
        // The process the walk starts from is in it too.
        assert_eq!(records.iter().filter(|r| r.pid == std::process::id()).count(), 1, "this process");
        let proc_pids = std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| !status_has_no_memory(*pid))
            .count();
        // Processes that came or went between the two reads aside.
        assert!(records.len().abs_diff(proc_pids) <= 5, "{} records, {proc_pids} in /proc", records.len());
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kernel threads (and processes gone meanwhile) have no `VmRSS` line.
    fn status_has_no_memory(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_or(true, |s| !s.contains("\nVmRSS:"))
    }

    #[test]
    fn a_pass_gives_what_proc_prints_for_a_still_process() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep");
        std::thread::sleep(std::time::Duration::from_millis(200));
        let pid = child.id();
        let mut iter = TaskIter::load().expect("load the task iterator");
        let records = iter.pass().expect("a pass").to_vec();
        let me = *records.iter().find(|r| r.pid == pid).expect("the sleeping child is in the pass");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let (comm, start) = crate::sources::proc_sampler::parse_stat(&stat).expect("parse stat");
        let pages = |key| status_pages(pid, key);
        let expected = [pages("RssFile:"), pages("RssAnon:"), pages("VmSwap:"), pages("RssShmem:")];
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(me.partial, 0);
        assert_eq!(me.pages[page::FILE], expected[0]);
        assert_eq!(me.pages[page::ANON], expected[1]);
        assert_eq!(me.pages[page::SWAP], expected[2]);
        assert_eq!(me.pages[page::SHMEM], expected[3]);
        assert!(me.pages[page::ANON] > 0 && me.pages[page::FILE] > 0, "{me:?}");
        assert_eq!(comm, "sleep");
        assert_eq!(&me.comm[..6], b"sleep\0");
        assert_eq!(me.start_ns / 10_000_000, start, "start time in clock ticks");
        // No thread appears twice, no kernel thread appears at all.
        let mut pids: Vec<u32> = records.iter().map(|r| r.pid).collect();
        pids.dedup();
        assert_eq!(pids.len(), records.len());
        assert!(!records.iter().any(|r| r.pid == 2), "kthreadd has no memory of its own");
    }
}
