//! The running kernel's type information (`/sys/kernel/btf/vmlinux`), read for the few
//! struct offsets the task iterator needs.
//!
//! A reader of our own: aya 0.16 parses BTF but keeps its type lookups private, and the
//! maintained BTF crate (btf-rs) is LGPL, which this MIT/Apache project does not take
//! in. The format is small (a header, fixed records with kind-specific tails, a
//! string table); only names, struct members, arrays and enumerators are looked at.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;

/// BTF kinds (`BTF_KIND_*`).
mod kind {
    pub const INT: u32 = 1;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("read {path}")]
    Read { path: String, source: std::io::Error },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
}

/// One type record: where it starts, its kind, its tail's length in entries.
#[derive(Clone, Copy, Debug)]
struct Record {
    at: usize,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    name: u32,
    /// The size, or the referred type, depending on the kind.
    size_or_type: u32,
}

/// A struct member found by name: its offset in bytes and its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub offset: u32,
    pub type_id: u32,
}

pub struct KernelBtf {
    data: Vec<u8>,
    strings: std::ops::Range<usize>,
    /// Index = type id; 0 is `void`.
    records: Vec<Record>,
    /// Struct names → ids of complete structs (the first one of a name).
    structs: HashMap<String, u32>,
}

impl KernelBtf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|source| BtfError::Read { path: path.to_owned(), source })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let u32_at = |at: usize| -> Result<u32, BtfError> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .ok_or(BtfError::Malformed("truncated"))
        };
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed("no BTF header (or not little-endian)"));
        }
        let header = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types = header + type_off..header + type_off + type_len;
        let strings = header + str_off..header + str_off + str_len;
        if types.end > data.len() || strings.end > data.len() {
            return Err(BtfError::Malformed("sections past the end"));
        }
        let mut records =
            vec![Record { at: 0, kind: 0, vlen: 0, kind_flag: false, name: 0, size_or_type: 0 }];
        let mut at = types.start;
        while at + 12 <= types.end {
            let info = u32_at(at + 4)?;
            let record = Record {
                at,
                kind: (info >> 24) & 0x1f,
                vlen: (info & 0xffff) as usize,
                kind_flag: info >> 31 == 1,
                name: u32_at(at)?,
                size_or_type: u32_at(at + 8)?,
            };
            let tail = match record.kind {
                kind::INT | kind::VAR | kind::DECL_TAG => 4,
                kind::ARRAY => 12,
                kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => 12 * record.vlen,
                kind::ENUM | kind::FUNC_PROTO => 8 * record.vlen,
                _ => 0,
            };
            records.push(record);
            at += 12 + tail;
        }
        if at != types.end {
            return Err(BtfError::Malformed("type section does not end on a record"));
        }
        let mut btf = Self { data, strings, records, structs: HashMap::new() };
        let mut structs = HashMap::new();
        for (id, r) in btf.records.iter().enumerate().skip(1) {
            if r.kind == kind::STRUCT && r.vlen > 0 {
                structs.entry(btf.name(r.name).to_owned()).or_insert(id as u32);
            }
        }
        btf.structs = structs;
        Ok(btf)
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.data[at..at + 4].try_into().expect("checked at parse"))
    }

    fn name(&self, offset: u32) -> &str {
        let start = self.strings.start + offset as usize;
        let bytes = self.data.get(start..self.strings.end).unwrap_or_default();
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap_or("")
    }

    fn record(&self, id: u32) -> Option<Record> {
        self.records.get(id as usize).copied().filter(|_| id != 0)
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<Record> {
        for _ in 0..32 {
            let r = self.record(id)?;
            match r.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = r.size_or_type;
                }
                _ => return Some(r),
            }
        }
        None
    }

    pub fn struct_id(&self, name: &str) -> Option<u32> {
        self.structs.get(name).copied()
    }

    /// A struct's size in bytes.
    pub fn size_of(&self, name: &str) -> Option<u32> {
        Some(self.record(self.struct_id(name)?)?.size_or_type)
    }

    /// The member `name` of struct or union `id`, looking inside anonymous members as C
    /// does (`mm_struct`'s fields sit in an unnamed struct).
    fn member_of(&self, id: u32, name: &str) -> Option<Member> {
        let r = self.resolve(id)?;
        if r.kind != kind::STRUCT && r.kind != kind::UNION {
            return None;
        }
        for i in 0..r.vlen {
            let at = r.at + 12 + 12 * i;
            let (member_name, type_id, raw) = (self.u32_at(at), self.u32_at(at + 4), self.u32_at(at + 8));
            // With the kind flag, the top byte is a bitfield's width.
            let bits = if r.kind_flag { raw & 0x00ff_ffff } else { raw };
            if bits % 8 != 0 {
                continue;
            }
            let offset = bits / 8;
            if self.name(member_name) == name {
                return Some(Member { offset, type_id });
            }
            if member_name == 0 {
                if let Some(inner) = self.member_of(type_id, name) {
                    return Some(Member { offset: offset + inner.offset, type_id: inner.type_id });
                }
            }
        }
        None
    }

    /// `offsetof(struct name, member)`, where `member` may be a dotted path.
    pub fn offset_of(&self, name: &str, member: &str) -> Option<Member> {
        let mut id = self.struct_id(name)?;
        let mut total = 0;
        let mut found = None;
        for part in member.split('.') {
            let m = self.member_of(id, part)?;
            total += m.offset;
            id = m.type_id;
            found = Some(Member { offset: total, type_id: m.type_id });
        }
        found
    }

    /// An array type's element type (resolved) and length.
    pub fn array_of(&self, id: u32) -> Option<(u32, u32)> {
        let r = self.resolve(id)?;
        (r.kind == kind::ARRAY).then(|| (self.u32_at(r.at + 12), self.u32_at(r.at + 20)))
    }

    /// The name of a struct type (behind typedefs and qualifiers).
    pub fn struct_name(&self, id: u32) -> Option<&str> {
        let r = self.resolve(id)?;
        (r.kind == kind::STRUCT).then(|| self.name(r.name))
    }

    /// The value of an enumerator, whichever enum (named or not) holds it.
    pub fn enumerator(&self, name: &str) -> Option<i64> {
        self.records.iter().skip(1).find_map(|r| {
            let width = match r.kind {
                kind::ENUM => 8,
                kind::ENUM64 => 12,
                _ => return None,
            };
            let at =
                (0..r.vlen).map(|i| r.at + 12 + width * i).find(|at| self.name(self.u32_at(*at)) == name)?;
            Some(if r.kind == kind::ENUM {
                i64::from(self.u32_at(at + 4) as i32)
            } else {
                (u64::from(self.u32_at(at + 4)) | u64::from(self.u32_at(at + 8)) << 32) as i64
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_running_kernels_task_fields() {
        let btf = KernelBtf::from_sys_fs().expect("kernel BTF");
        let pid = btf.offset_of("task_struct", "pid").expect("pid");
        let tgid = btf.offset_of("task_struct", "tgid").expect("tgid");
        assert_eq!(tgid.offset, pid.offset + 4);
        let rss = btf.offset_of("mm_struct", "rss_stat").expect("rss_stat");
        let (element, count) = btf.array_of(rss.type_id).expect("an array");
        assert_eq!(btf.struct_name(element), Some("percpu_counter"));
        assert_eq!(count, 4, "NR_MM_COUNTERS");
        assert_eq!(btf.enumerator("MM_ANONPAGES"), Some(1));
        assert_eq!(btf.enumerator("MM_SHMEMPAGES"), Some(3));
        assert!(btf.offset_of("bpf_array", "pptrs").is_some(), "in bpf_array's unnamed union");
        assert_eq!(btf.offset_of("task_struct", "no_such_field"), None);
        assert!(btf.size_of("percpu_counter").is_some_and(|s| s >= 16));
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(KernelBtf::parse(vec![0; 64]).is_err());
        let mut truncated = std::fs::read("/sys/kernel/btf/vmlinux").expect("kernel BTF");
        truncated.truncate(4096);
        assert!(KernelBtf::parse(truncated).is_err());
    }
}
