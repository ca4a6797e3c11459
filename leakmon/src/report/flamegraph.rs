//! A flame graph (SVG) of unfreed bytes, drawn by inferno from the folded stacks.

use inferno::flamegraph::{color::BasicPalette, color::Palette, Options};

use super::{folded, Report};

/// The SVG; a report without unfreed bytes gives a graph that says so.
pub fn render(report: &Report, title: &str) -> std::io::Result<Vec<u8>> {
    let lines = folded::render(report);
    let mut options = Options::default();
    title.clone_into(&mut options.title);
    "bytes".clone_into(&mut options.count_name);
    "Allocated at:".clone_into(&mut options.name_type);
    options.colors = Palette::Basic(BasicPalette::Mem);
    let mut svg = Vec::new();
    if lines.is_empty() {
        // inferno refuses empty input; one zero-width root keeps the output an SVG.
        options.subtitle = Some("nothing unfreed".to_owned());
        inferno::flamegraph::from_lines(&mut options, ["(nothing unfreed) 1"], &mut svg)?;
    } else {
        inferno::flamegraph::from_lines(&mut options, lines.lines(), &mut svg)?;
    }
    Ok(svg)
}
