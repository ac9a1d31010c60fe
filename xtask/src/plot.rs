//! The plot of `cargo xtask bench --vm`'s online row: MiB re-encrypted over time for cryptfs and
//! the reference, from the curve table `tests/vm_bench.rs` writes into
//! `design/results/bench-vm-online.md` (`| tool | s | MiB |` rows), drawn to a PNG beside it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

/// The font the labels are drawn with (package fonts-dejavu-core).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// (tool, [(seconds, MiB)]) from the result file's curve rows.
pub fn curves(markdown: &str) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut in_curve = false;
    for line in markdown.lines() {
        if line.starts_with("## ") {
            in_curve = line.contains("MiB done over time");
            continue;
        }
        if !in_curve {
            continue;
        }
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if let [tool, s, mib] = cells.as_slice() {
            if let (Ok(s), Ok(mib)) = (s.parse::<f64>(), mib.parse::<f64>()) {
                out.entry(tool.to_string()).or_default().push((s, mib));
            }
        }
    }
    out
}

/// Draws the curves of `results` (the markdown file) to `png`.
pub fn draw(results: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(results)
        .with_context(|| format!("cannot read {}", results.display()))?;
    let curves = curves(&text);
    if curves.len() < 2 || curves.values().any(|c| c.len() < 2) {
        bail!(
            "{} has no two curves to plot (rows under \"MiB done over time\")",
            results.display()
        );
    }
    let font = std::fs::read(FONT).with_context(|| format!("cannot read the font {FONT}"))?;
    // plotters keeps the registered font for the process's life.
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into()))
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable TrueType font"))?;
    let max_s = curves
        .values()
        .flatten()
        .map(|(s, _)| *s)
        .fold(1.0, f64::max);
    let max_mib = curves
        .values()
        .flatten()
        .map(|(_, m)| *m)
        .fold(1.0, f64::max);
    let root = BitMapBackend::new(png, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Online re-encryption of the mounted root under a write+fsync workload",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_s * 1.05, 0.0..max_mib * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first progress report")
        .y_desc("MiB re-encrypted")
        .label_style(("sans-serif", 15))
        .draw()?;
    for (tool, points) in &curves {
        let colour = if tool == "cryptfs" {
            RGBColor(0, 110, 200)
        } else {
            RGBColor(210, 90, 20)
        };
        let style = ShapeStyle::from(&colour).stroke_width(3);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))?
            .label(tool.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    println!("xtask: plot written to {}", png.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_come_from_the_rows_under_their_heading_only() {
        let md = "# x\n\n| tool | round | s |\n|---|---|---|\n| cryptfs | 1 | 3.0 |\n\n\
                  ## MiB done over time (first round)\n\n| tool | s | MiB |\n|---|---|---|\n\
                  | reference | 0.0 | 0 |\n| reference | 1.5 | 8 |\n| cryptfs | 0.0 | 0 |\n\n## next\n| cryptfs | 9 | 9 |\n";
        let c = curves(md);
        assert_eq!(c["reference"], vec![(0.0, 0.0), (1.5, 8.0)]);
        assert_eq!(c["cryptfs"], vec![(0.0, 0.0)]);
    }

    #[test]
    fn a_png_is_drawn_from_two_curves() {
        // The font is one of the packages `cargo xtask deps` installs.
        assert!(
            Path::new(FONT).exists(),
            "{FONT} missing: run `cargo xtask deps`"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let md = dir.path().join("r.md");
        std::fs::write(
            &md,
            "## MiB done over time\n| reference | 0 | 0 |\n| reference | 10 | 80 |\n\
             | cryptfs | 0 | 0 |\n| cryptfs | 6 | 80 |\n",
        )
        .expect("write");
        let png = dir.path().join("r.png");
        draw(&md, &png).expect("draw");
        let bytes = std::fs::read(&png).expect("png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
        assert!(
            bytes.len() > 5_000,
            "more than a blank image: {}",
            bytes.len()
        );
    }
}
