//! tracefs: make sure it is mounted (aya attaches tracepoints through it) and read the
//! field offsets of the lifecycle tracepoints from this kernel's `format` files.

use std::{fs, io, path::Path};

use leakmon_common::TracepointOffsets;

const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at /sys/kernel/tracing unless it (or the debugfs copy) is there.
pub fn ensure_mounted() -> io::Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() || Path::new("/sys/kernel/debug/tracing/events").is_dir() {
        return Ok(());
    }
    nix::mount::mount(Some("tracefs"), TRACEFS, Some("tracefs"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(io::Error::from)
}

fn events_dir() -> &'static Path {
    if Path::new(TRACEFS).join("events").is_dir() {
        Path::new("/sys/kernel/tracing/events")
    } else {
        Path::new("/sys/kernel/debug/tracing/events")
    }
}

/// The offset of `field` in a tracepoint `format` file's text.
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.rsplit(' ').next()?.split('[').next()?;
        if name != field {
            return None;
        }
        rest.trim().strip_prefix("offset:")?.split(';').next()?.parse().ok()
    })
}

/// Offsets of the fields the lifecycle programs read; the defaults of
/// [`TracepointOffsets`] where a file cannot be read.
pub fn tracepoint_offsets() -> TracepointOffsets {
    let read = |event: &str| fs::read_to_string(events_dir().join(event).join("format")).unwrap_or_default();
    let newtask = read("task/task_newtask");
    let exit = read("sched/sched_process_exit");
    let oom = read("oom/mark_victim");
    let mut offsets = TracepointOffsets::default();
    if let Some(o) = field_offset(&newtask, "pid") {
        offsets.newtask_pid = o;
    }
    if let Some(o) = field_offset(&newtask, "clone_flags") {
        offsets.newtask_clone_flags = o;
    }
    if let Some(o) = field_offset(&exit, "group_dead") {
        offsets.exit_group_dead = o;
    }
    if let Some(o) = field_offset(&oom, "pid") {
        offsets.oom_victim_pid = o;
    }
    offsets
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXIT: &str = "name: sched_process_exit
ID: 300
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;
";

    #[test]
    fn reads_offsets_from_a_format_file() {
        assert_eq!(field_offset(EXIT, "pid"), Some(24));
        assert_eq!(field_offset(EXIT, "comm"), Some(8));
        assert_eq!(field_offset(EXIT, "group_dead"), Some(32));
        assert_eq!(field_offset(EXIT, "common_pid"), Some(4));
        assert_eq!(field_offset(EXIT, "missing"), None);
    }
}
