//! A pprof profile of unfreed memory (gzipped `profile.proto`), the format `go tool
//! pprof` and continuous-profiling stores read. Sample types as in Go heap profiles:
//! `inuse_objects` (count) and `inuse_space` (bytes), one sample per stack with `pid`
//! and `comm` labels; locations innermost first.
//!
//! The messages are declared here with prost's derive, with the field numbers of the
//! published profile.proto; only the fields leakmon fills are declared.

use std::{collections::HashMap, io::Write as _};

use super::Report;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// Interns strings, functions and locations while samples are added.
#[derive(Default)]
struct Builder {
    profile: Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(String, String), u64>,
    locations: HashMap<(u32, u64, String), u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        if let Some(&id) = self.functions.get(&(name.to_owned(), file.to_owned())) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let (name_i, file_i) = (self.string(name), self.string(file));
        self.profile.function.push(Function { id, name: name_i, system_name: name_i, filename: file_i });
        self.functions.insert((name.to_owned(), file.to_owned()), id);
        id
    }

    /// One location per (process, address): the same address in two processes can be
    /// different code.
    fn location(&mut self, pid: u32, address: u64, function: &str, file: &str, line: i64) -> u64 {
        let key = (pid, address, function.to_owned());
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let id = self.profile.location.len() as u64 + 1;
        let function_id = self.function(function, file);
        self.profile.location.push(Location { id, address, line: vec![Line { function_id, line }] });
        self.locations.insert(key, id);
        id
    }
}

/// The profile of every process in `report`.
pub fn profile(report: &Report, time_nanos: i64) -> Profile {
    let mut b = Builder::default();
    b.string("");
    let value_type = |b: &mut Builder, t: &str, u: &str| ValueType { r#type: b.string(t), unit: b.string(u) };
    b.profile.sample_type =
        vec![value_type(&mut b, "inuse_objects", "count"), value_type(&mut b, "inuse_space", "bytes")];
    b.profile.period_type = Some(value_type(&mut b, "space", "bytes"));
    b.profile.period = 1;
    b.profile.default_sample_type = b.string("inuse_space");
    b.profile.time_nanos = time_nanos;
    let (pid_key, comm_key) = (b.string("pid"), b.string("comm"));
    for process in &report.processes {
        let comm = b.string(&process.comm);
        for stack in process.stacks.iter().filter(|s| s.bytes > 0) {
            let mut location_id: Vec<u64> = stack
                .frames
                .iter()
                .map(|f| {
                    let address = u64::from_str_radix(f.address.trim_start_matches("0x"), 16).unwrap_or(0);
                    let line = f.line.map_or(0, i64::from);
                    b.location(process.pid, address, &f.function, f.file.as_deref().unwrap_or(""), line)
                })
                .collect();
            if location_id.is_empty() {
                location_id.push(b.location(process.pid, 0, "[unknown]", "", 0));
            }
            b.profile.sample.push(Sample {
                location_id,
                value: vec![stack.allocations as i64, stack.bytes as i64],
                label: vec![
                    Label { key: pid_key, str: 0, num: i64::from(process.pid) },
                    Label { key: comm_key, str: comm, num: 0 },
                ],
            });
        }
    }
    b.profile
}

/// The gzipped encoding, as served at `/debug/pprof/heap` and written by
/// `report --format pprof`.
pub fn encode(profile: &Profile) -> Vec<u8> {
    let raw = prost::Message::encode_to_vec(profile);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}
