//! Every process's memory counters in one pass: the `leakmon-tasks` object's task
//! iterator (see `leakmon_common::task_memory`), read once a tick.
//!
//! aya 0.16 turns an iterator's link into one readable file and consumes the link
//! doing it (`IterLink::into_file`); a pass a second needs a new file from the same
//! link each time, so the link and the files are made with the raw calls
//! (`BPF_LINK_CREATE`, `BPF_ITER_CREATE`), small enough to upstream as
//! `IterLink::create_file(&self)`.

use std::{
    io::Read as _,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    programs::{Iter, ProgramFd},
    Btf, Ebpf, EbpfLoader,
};
use leakmon_common::task_memory::{TaskLayout, TaskMemory, COUNTERS, LAYOUT_GLOBAL, MAX_CPUS, PROGRAM};

use super::kernel_btf::KernelBtf;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leakmon-tasks"));

/// bpf(2) commands and the iterator's attach type.
const LINK_CREATE: libc::c_long = 28;
const ITER_CREATE: libc::c_long = 33;
const TRACE_ITER: u32 = 28;

/// The loaded iterator; each [`TaskIter::pass`] is one walk over the kernel's tasks.
pub struct TaskIter {
    // Kept for the program's and maps' lifetime.
    _ebpf: Ebpf,
    link: OwnedFd,
    /// Kept from pass to pass: a pass is a few hundred KiB at 10,000 processes.
    buffer: Vec<u8>,
    records: Vec<TaskMemory>,
}

impl TaskIter {
    /// Loads the iterator with the running kernel's offsets; an error says in one line
    /// what this kernel lacks.
    pub fn load() -> Result<Self> {
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
            .load(OBJECT)
            .context("load the task iterator's object")?;
        let program: &mut Iter = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("the task iterator has no program {PROGRAM}"))?
            .try_into()?;
        program.load("task", &btf).context("load the task iterator (Linux 5.8+ with BTF)")?;
        let link = link_create(program.fd()?)?;
        Ok(Self { _ebpf: ebpf, link, buffer: Vec::new(), records: Vec::new() })
    }

    /// One record per process with memory of its own, in pid order.
    pub fn pass(&mut self) -> Result<&mut [TaskMemory]> {
        let mut attr = [0u32; 2];
        attr[0] = self.link.as_raw_fd() as u32;
        // SAFETY: `attr` is the `iter_create` member of `union bpf_attr`.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, ITER_CREATE, attr.as_mut_ptr(), 8u32) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("start a pass of the task iterator");
        }
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        self.buffer.clear();
        file.read_to_end(&mut self.buffer).context("read the task iterator")?;
        let size = std::mem::size_of::<TaskMemory>();
        if !self.buffer.len().is_multiple_of(size) {
            bail!("the task iterator wrote {} bytes, not whole records", self.buffer.len());
        }
        self.records.clear();
        self.records.extend(
            self.buffer
                .chunks_exact(size)
                // SAFETY: whole records of a Pod type.
                .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<TaskMemory>()) }),
        );
        Ok(&mut self.records)
    }
}

fn link_create(program: &ProgramFd) -> Result<OwnedFd> {
    // The `link_create` member of `union bpf_attr`: program, target, attach type,
    // flags, then the (unused) iterator options.
    let mut attr = [0u64; 4];
    attr[0] = u64::from(program.as_fd().as_raw_fd() as u32);
    attr[1] = u64::from(TRACE_ITER);
    // SAFETY: `attr` is large enough for the member and alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, LINK_CREATE, attr.as_mut_ptr(), 32u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("attach the task iterator");
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
        _pad: 0,
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
