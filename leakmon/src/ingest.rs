//! Ingest: draining and decoding what the kernel sends through the lifecycle ring
//! buffer.
//!
//! In: raw ring-buffer records. Out: [`LifecycleEvent`]s, or `None` for a record of the
//! wrong size (never trusted). The ring is drained on a task of its own: a sampling
//! tick that takes long (reading a large totals table) must not leave the ring full
//! while processes fork and exit by the thousand.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use aya::maps::{MapData, RingBuf};
use leakmon_common::LifecycleEvent;
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};

/// Events decoded but not yet handled: 262,144 × 32 B (8 MiB) at most, seconds of the
/// fastest fork storm measured here.
pub const QUEUE: usize = 1 << 18;

/// Drains `ring` into a bounded queue. Records of the wrong size, and events that find
/// the queue full, are counted in `malformed` and `dropped`.
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    dropped: Arc<AtomicU64>,
    malformed: Arc<AtomicU64>,
) -> std::io::Result<(JoinHandle<()>, mpsc::Receiver<LifecycleEvent>)> {
    // SAFETY: the ring buffer owns its fd and moves into the registration, so the fd
    // is closed only when the registration is dropped (at the end of the task).
    let mut fd = unsafe { AsyncFd::register(ring) }?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let task = tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                tracing::error!("the lifecycle ring buffer cannot be watched any more");
                return;
            };
            while let Some(record) = guard.get_inner_mut().next() {
                match decode(&record) {
                    Some(ev) => {
                        if tx.try_send(ev).is_err() {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    None => {
                        malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            guard.clear_ready();
        }
    });
    Ok((task, rx))
}

/// Decodes one ring-buffer record.
pub fn decode(record: &[u8]) -> Option<LifecycleEvent> {
    if record.len() != std::mem::size_of::<LifecycleEvent>() {
        return None;
    }
    // SAFETY: the length matches and LifecycleEvent is plain old data; the read is
    // unaligned because ring-buffer records are only 8-byte aligned by convention.
    Some(unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<LifecycleEvent>()) })
}

/// The process name in an event, up to its NUL.
pub fn comm(event: &LifecycleEvent) -> String {
    let end = event.comm.iter().position(|&b| b == 0).unwrap_or(event.comm.len());
    String::from_utf8_lossy(&event.comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use leakmon_common::event;

    #[test]
    fn decodes_an_event_and_rejects_wrong_sizes() {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"fixture");
        let ev = LifecycleEvent { kind: event::EXIT, tgid: 42, child: 0, gen: 3, comm };
        // SAFETY: viewing a repr(C) POD struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const ev).cast::<u8>(), std::mem::size_of::<LifecycleEvent>())
        };
        let back = decode(bytes).expect("decodes");
        assert_eq!(back, ev);
        assert_eq!(crate::ingest::comm(&back), "fixture");
        assert!(decode(&bytes[..31]).is_none());
        assert!(decode(&[0u8; 33]).is_none());
    }

    /// The kept corpus, `tests/corpus/events`: real records of each kind and malformed
    /// ones (short, long, empty, unknown kind, a name without its NUL, invalid UTF-8).
    #[test]
    fn the_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/events");
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).expect("corpus directory") {
            let path = entry.expect("corpus entry").path();
            let record = std::fs::read(&path).expect("read record");
            let decoded = decode(&record);
            assert_eq!(decoded.is_some(), record.len() == std::mem::size_of::<LifecycleEvent>(), "{path:?}");
            if let Some(ev) = decoded {
                assert!(comm(&ev).chars().count() <= 16, "{path:?}");
            }
            files += 1;
        }
        assert!(files >= 8, "{files} corpus files");
    }

    proptest::proptest! {
        /// Any record: decoded only when it has an event's exact size, never a panic.
        #[test]
        fn any_record_decodes_only_at_the_exact_size(record in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100)) {
            let decoded = decode(&record);
            proptest::prop_assert_eq!(decoded.is_some(), record.len() == std::mem::size_of::<LifecycleEvent>());
            if let Some(ev) = decoded {
                let _ = comm(&ev);
            }
        }
    }
}
