//! Ingest: decoding what the kernel sends through the lifecycle ring buffer.
//!
//! In: raw ring-buffer records. Out: [`LifecycleEvent`]s, or `None` for a record of the
//! wrong size (counted by the caller, never trusted).

use leakmon_common::LifecycleEvent;

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
}
