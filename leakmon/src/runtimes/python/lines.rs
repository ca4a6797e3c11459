//! CPython 3.11+ location tables (`co_linetable`): which source line an instruction
//! offset belongs to.
//!
//! Each entry covers 1 to 8 code units; its first byte has the high bit set, a 4-bit
//! kind and the unit count minus one; what follows depends on the kind. Only the line
//! is decoded here; columns are skipped.

/// The line of the instruction `lasti` code units into the code object whose table is
/// `table` and whose first line is `first_line`; `None` for an instruction without a
/// location, or past the table.
pub fn line_of(table: &[u8], first_line: u32, lasti: u32) -> Option<u32> {
    let mut bytes = table.iter().copied();
    let mut line = i64::from(first_line);
    let mut start = 0u32;
    while let Some(head) = bytes.next() {
        let kind = (head >> 3) & 15;
        let units = u32::from(head & 7) + 1;
        let delta = match kind {
            // No location.
            15 => None,
            // Long form: line delta, end-line delta, column and end column.
            14 => {
                let delta = signed(&mut bytes)?;
                for _ in 0..3 {
                    varint(&mut bytes)?;
                }
                Some(delta)
            }
            // No column.
            13 => Some(signed(&mut bytes)?),
            // One-line forms: the delta is in the kind; two column bytes follow.
            10..=12 => {
                bytes.next()?;
                bytes.next()?;
                Some(i64::from(kind) - 10)
            }
            // Short forms: same line, one column byte.
            _ => {
                bytes.next()?;
                Some(0)
            }
        };
        if let Some(delta) = delta {
            line += delta;
        }
        if lasti < start + units {
            return delta.and_then(|_| u32::try_from(line).ok());
        }
        start += units;
    }
    None
}

/// An unsigned varint: 6 bits a byte, low bits first, bit 6 set while more follow.
fn varint(bytes: &mut impl Iterator<Item = u8>) -> Option<u64> {
    let mut byte = bytes.next()?;
    let mut value = u64::from(byte & 63);
    let mut shift = 0;
    while byte & 64 != 0 && shift < 60 {
        byte = bytes.next()?;
        shift += 6;
        value |= u64::from(byte & 63) << shift;
    }
    Some(value)
}

/// A signed varint: the sign in the lowest bit.
fn signed(bytes: &mut impl Iterator<Item = u8>) -> Option<i64> {
    let value = varint(bytes)?;
    let magnitude = (value >> 1) as i64;
    Some(if value & 1 != 0 { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instruction of a real module's code objects, against the lines CPython
    /// itself gives (`co_lines()`), on each interpreter installed here.
    #[test]
    fn lines_match_cpythons_own_for_every_instruction() {
        let script = r#"
import sys, types, json
src = open(sys.argv[1]).read()
out = []
def walk(co):
    out.append({"table": co.co_linetable.hex(), "first": co.co_firstlineno,
                "lines": [[s, e, l] for s, e, l in co.co_lines()]})
    for c in co.co_consts:
        if isinstance(c, types.CodeType):
            walk(c)
walk(compile(src, sys.argv[1], "exec"))
print(json.dumps(out))
"#;
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/python/cache_leak.py");
        let mut checked = 0;
        for python in crate::runtimes::python::tests::interpreters() {
            let out = std::process::Command::new(&python)
                .args(["-c", script, source])
                .output()
                .unwrap_or_else(|e| panic!("run {python}: {e}"));
            assert!(out.status.success(), "{python}: {}", String::from_utf8_lossy(&out.stderr));
            let codes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
            for code in codes {
                let table = hex(code["table"].as_str().expect("table"));
                let first = code["first"].as_u64().expect("first") as u32;
                for range in code["lines"].as_array().expect("lines") {
                    let (start, end) = (range[0].as_u64().unwrap() as u32, range[1].as_u64().unwrap() as u32);
                    let expected = range[2].as_u64().map(|l| l as u32);
                    for byte in (start..end).step_by(2) {
                        assert_eq!(line_of(&table, first, byte / 2), expected, "{python}, offset {byte}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 300, "only {checked} instructions checked");
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
    }
}
