//! A whole hash table read in a few system calls (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6),
//! where aya 0.16's iterator makes two per entry (the next key, then its value): at
//! 131,072 stacks read each second that was a third of a core. aya wraps no batched
//! lookup yet, so this is the raw call, small enough to upstream as `HashMap::batch`.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{maps::MapData, Pod};

/// `BPF_MAP_LOOKUP_BATCH`, the bpf(2) command.
const LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call to start with; doubled where one bucket holds more.
const FIRST_CHUNK: usize = 8192;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of the hash map `map`; `None` where the kernel has no batched
/// lookup for it (the caller reads it entry by entry then).
pub fn entries<K: Pod, V: Pod>(map: &MapData) -> std::io::Result<Option<Vec<(K, V)>>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    let mut chunk = FIRST_CHUNK;
    let mut out = Vec::new();
    // The hash table's cursor: a bucket index.
    let mut cursor: u32 = 0;
    let mut first = true;
    loop {
        let mut keys = vec![0u8; chunk * ks];
        let mut values = vec![0u8; chunk * vs];
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const cursor) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `count` keys and values, and at the two
        // cursors, all alive for the call.
        let ret = unsafe {
            libc::syscall(libc::SYS_bpf, LOOKUP_BATCH, &raw mut attr, std::mem::size_of::<BatchAttr>() as u32)
        };
        let error = (ret < 0).then(std::io::Error::last_os_error);
        let got = (attr.count as usize).min(chunk);
        for i in 0..got {
            // SAFETY: the kernel wrote `got` whole keys and values; Pod types take any bytes.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * ks).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * vs).cast::<V>()),
                )
            };
            out.push((k, v));
        }
        match error.as_ref().and_then(std::io::Error::raw_os_error) {
            None => {}
            // The table's end.
            Some(libc::ENOENT) => return Ok(Some(out)),
            // One bucket holds more than a chunk: the same cursor again, asking for more.
            Some(libc::ENOSPC) if got == 0 && chunk < 1 << 24 => {
                chunk *= 2;
                continue;
            }
            // No batched lookup for this map (the kernel's own ENOTSUPP is 524).
            Some(libc::EINVAL | libc::EOPNOTSUPP | 524) if first && out.is_empty() => return Ok(None),
            Some(_) => return Err(error.expect("an error")),
        }
        cursor = next;
        first = false;
    }
}
