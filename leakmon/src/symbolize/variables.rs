//! Where a global variable is declared (file and line), from an object's DWARF: each
//! variable with a fixed address names its file and line. blazesym names a variable
//! by its symbol; this adds where it comes from, for a holder's root.

use std::{borrow::Cow, collections::HashMap};

use gimli::{AttributeValue, EndianSlice, LittleEndian};
use object::{Object as _, ObjectSection as _};

/// A variable's declaration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declared {
    pub file: String,
    pub line: u32,
}

/// Variables walked per object at most: a huge object's DWARF is not walked whole
/// for a root's name.
const MAX_ENTRIES: usize = 4_000_000;

/// The declarations of the variables of the ELF object `elf`, by their address in it;
/// empty without DWARF.
pub fn declarations(elf: &[u8]) -> HashMap<u64, Declared> {
    let Ok(file) = object::File::parse(elf) else { return HashMap::new() };
    let load = |id: gimli::SectionId| -> Result<Cow<'_, [u8]>, gimli::Error> {
        Ok(file
            .section_by_name(id.name())
            .and_then(|s| s.uncompressed_data().ok())
            .unwrap_or(Cow::Borrowed(&[])))
    };
    let Ok(sections) = gimli::DwarfSections::load(load) else { return HashMap::new() };
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
    let mut out = HashMap::new();
    let mut seen = 0usize;
    let mut units = dwarf.units();
    while let Ok(Some(header)) = units.next() {
        let Ok(unit) = dwarf.unit(header) else { continue };
        let mut entries = unit.entries();
        while let Ok(Some(entry)) = entries.next_dfs() {
            seen += 1;
            if seen > MAX_ENTRIES {
                return out;
            }
            if entry.tag() != gimli::DW_TAG_variable {
                continue;
            }
            let Some(AttributeValue::Exprloc(expr)) = entry.attr_value(gimli::DW_AT_location) else {
                continue;
            };
            // DW_OP_addr and the address, alone: a variable of fixed address.
            let bytes = expr.0.slice();
            let [0x03, address @ ..] = bytes else { continue };
            let Ok(address) = <[u8; 8]>::try_from(address) else { continue };
            let (Some(AttributeValue::FileIndex(index)), Some(line)) =
                (entry.attr_value(gimli::DW_AT_decl_file), entry.attr_value(gimli::DW_AT_decl_line))
            else {
                continue;
            };
            let (Some(line), Some(file)) = (line.udata_value(), file_name(&dwarf, &unit, index)) else {
                continue;
            };
            out.insert(
                u64::from_le_bytes(address),
                Declared { file, line: u32::try_from(line).unwrap_or(0) },
            );
        }
    }
    out
}

type Slice<'a> = EndianSlice<'a, LittleEndian>;

/// File `index` of `unit`'s line program, with its directory.
fn file_name(dwarf: &gimli::Dwarf<Slice<'_>>, unit: &gimli::Unit<Slice<'_>>, index: u64) -> Option<String> {
    let header = unit.line_program.as_ref()?.header();
    let file = header.file(index)?;
    let name = dwarf.attr_string(unit, file.path_name()).ok()?.to_string_lossy().into_owned();
    if name.starts_with('/') {
        return Some(name);
    }
    let dir = file.directory(header).and_then(|d| dwarf.attr_string(unit, d).ok());
    Some(match dir {
        Some(dir) => format!("{}/{name}", dir.to_string_lossy()),
        None => name,
    })
}
