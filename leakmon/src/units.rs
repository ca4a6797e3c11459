//! Byte counts as people read them: binary units, the exact count beside.

/// Bytes with binary units, rounded.
pub fn rounded(n: u64) -> String {
    match bytes(n).split_once(" (") {
        Some((rounded, _)) => rounded.to_owned(),
        None => bytes(n),
    }
}

/// Bytes with binary units, exact below 1 KiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {} ({n} B)", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB (1536 B)");
        assert_eq!(rounded(1536), "1.5 KiB");
    }
}
