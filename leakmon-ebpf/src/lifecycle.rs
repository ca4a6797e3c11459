//! Process lifecycle: follow forks of traced processes, start a new image generation on
//! exec, and tell userspace when a traced process is gone.
//!
//! Hooks: `task:task_newtask`, `sched:sched_process_exec`, `sched:sched_process_exit`,
//! `oom:mark_victim` (every OOM kill, so restarts by the OOM killer are counted).
//! Maps: reads/writes `PROCS` and `UNWIND_PROCS` (a child starts with its parent's
//! mappings, a new image with none), writes `EVENTS`. On a full ring buffer the event is
//! counted (`EVENTS_LOST`) and userspace falls back to checking /proc.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    programs::TracePointContext,
};
use leakmon_common::{counter, event, proc_flags, LifecycleEvent, ProcState, CLONE_THREAD};

use crate::{
    maps::{count, tp_offsets, EVENTS, PROCS},
    unwind::UNWIND_PROCS,
};

fn emit(kind: u32, tgid: u32, child: u32, gen: u32) {
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let ev = LifecycleEvent { kind, tgid, child, gen, comm };
    if EVENTS.output::<LifecycleEvent>(&ev, 0).is_err() {
        count(counter::EVENTS_LOST);
    }
}

/// A traced process's new child (not a thread) is traced from its first instruction:
/// this runs in the parent, before the child can run.
#[tracepoint]
pub fn lifecycle_newtask(ctx: TracePointContext) -> u32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if PROCS.get_ptr(&parent).is_none() {
        return 0;
    }
    let off = tp_offsets();
    // SAFETY: offsets come from this kernel's tracefs format file.
    let Ok(flags) = (unsafe { ctx.read_at::<u64>(off.newtask_clone_flags as usize) }) else {
        return 0;
    };
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    // SAFETY: as above.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(off.newtask_pid as usize) }) else {
        return 0;
    };
    let child = child as u32;
    if PROCS.insert(&child, &ProcState::child_of(parent), u64::from(BPF_NOEXIST)).is_err() {
        match PROCS.get_ptr_mut(&child) {
            // SAFETY: pointer into the map value; the child has not run yet.
            Some(state) => unsafe {
                // An exited process's entry at the reused pid: the child is another
                // process, in a generation of its own.
                if (*state).exited() {
                    *state = ProcState { parent, ..(*state).reborn() };
                }
            },
            None => {
                count(counter::PROC_FULL);
                return 0;
            }
        }
    }
    // The child has its parent's mappings until it execs.
    if let Some(mappings) = UNWIND_PROCS.get_ptr(&parent) {
        // SAFETY: pointer into the parent's map value, copied by the helper.
        let _ = UNWIND_PROCS.insert(&child, unsafe { &*mappings }, u64::from(BPF_ANY));
    }
    emit(event::FORK, parent, child, 0);
    0
}

/// A new image: blocks of the old one can no longer be freed, so they belong to an
/// older generation that userspace drops.
#[tracepoint]
pub fn lifecycle_exec(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(state) = PROCS.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: pointer into the map value.
    if unsafe { (*state).exited() } {
        // A new process at a dead one's pid, not traced (yet).
        return 0;
    }
    // The old image's tables would misread the new one; frame pointers until userspace
    // gives the new image's.
    let _ = UNWIND_PROCS.remove(&tgid);
    // SAFETY: pointer into the map value; exec runs on one thread of the process.
    let gen = unsafe {
        (*state).gen += 1;
        // Its own image now, not its parent's mappings.
        (*state).parent = 0;
        (*state).gen
    };
    emit(event::EXEC, tgid, 0, gen);
    0
}

#[tracepoint]
pub fn lifecycle_exit(ctx: TracePointContext) -> u32 {
    let off = tp_offsets();
    // SAFETY: offset from this kernel's tracefs format file.
    let group_dead = unsafe { ctx.read_at::<u8>(off.exit_group_dead as usize) }.unwrap_or(0);
    if group_dead == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(state) = PROCS.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: pointer into the map value; the last thread of the process is exiting.
    // Marked rather than deleted: the pid may come back as another process before
    // userspace purges this one's blocks, and must not take them over.
    let gen = unsafe {
        (*state).flags |= proc_flags::EXITED;
        (*state).gen
    };
    let _ = UNWIND_PROCS.remove(&tgid);
    emit(event::EXIT, tgid, 0, gen);
    0
}

/// The OOM killer picked a victim: count it for its service, traced or not.
#[tracepoint]
pub fn lifecycle_oom(ctx: TracePointContext) -> u32 {
    let off = tp_offsets();
    // SAFETY: offset from this kernel's tracefs format file.
    let Ok(victim) = (unsafe { ctx.read_at::<i32>(off.oom_victim_pid as usize) }) else {
        return 0;
    };
    emit(event::OOM, victim as u32, 0, 0);
    0
}
