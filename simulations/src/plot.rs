//! PNG plots: admitted versus limit over time for one key of a scenario.
//!
//! Plotted for the first key of the first traffic group (the hottest in
//! every shipped scenario): the cluster's admissions in the trailing window
//! `(t − w, t]` (all nodes, and each node when there are at most five), the
//! single-node reference's, and the limit. Grey bands mark partitions and
//! down nodes.
//!
//! Text needs a font. plotters' `ab_glyph` backend takes font bytes at run
//! time: DejaVu Sans from Debian's `fonts-dejavu-core` is loaded from
//! [`FONT`] when present; without it the plot is drawn without any text
//! (axes, lines and bands only), so a machine without fonts still gets its
//! plots.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::run::{RunOutput, Served};
use crate::scenario::{FaultAction, Scenario};

pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const SIZE: (u32, u32) = (800, 400);
const POINTS: usize = 800;

/// Registers the font once; true when text can be drawn.
fn font() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        let Ok(bytes) = std::fs::read(FONT) else {
            return false;
        };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    })
}

/// Admissions in `(x − w, x]` at each of `xs` (all in ns).
fn trailing(times: &[u64], w: u64, xs: &[u64]) -> Vec<u64> {
    let (mut lo, mut hi) = (0, 0);
    xs.iter()
        .map(|&x| {
            while hi < times.len() && times[hi] <= x {
                hi += 1;
            }
            while lo < hi && times[lo] + w <= x {
                lo += 1;
            }
            (hi - lo) as u64
        })
        .collect()
}

/// Intervals (s) to shade: partitions and down nodes.
fn bands(s: &Scenario) -> Vec<(f64, f64)> {
    let end = s.duration.as_u64() as f64 / 1e9;
    let mut out = Vec::new();
    let mut open: Vec<(String, f64)> = Vec::new();
    for f in &s.faults {
        let t = f.at.as_u64() as f64 / 1e9;
        let (key, starts) = match &f.action {
            FaultAction::Isolate(g) => (format!("p{g:?}"), true),
            FaultAction::Heal(g) => (format!("p{g:?}"), false),
            FaultAction::Crash(n) => (format!("n{n}"), true),
            FaultAction::Restart(n) => (format!("n{n}"), false),
            FaultAction::Leave(n) => (format!("n{n}"), true),
            FaultAction::Pause(n) => (format!("z{n}"), true),
            FaultAction::Resume(n) => (format!("z{n}"), false),
            FaultAction::Link { a, b, up } => (format!("l{a}-{b}"), !up),
            FaultAction::OneWay { from, to, up } => (format!("o{from}-{to}"), !up),
            _ => continue,
        };
        if starts {
            open.push((key, t));
        } else if let Some(i) = open.iter().position(|(k, _)| *k == key) {
            let (_, from) = open.remove(i);
            out.push((from, t));
        }
    }
    out.extend(open.into_iter().map(|(_, from)| (from, end)));
    out
}

pub fn plot(s: &Scenario, out: &RunOutput, path: &Path) -> Result<(), String> {
    draw(s, out, path, font()).map_err(|e| format!("{}: {e}", path.display()))
}

fn draw(
    s: &Scenario,
    out: &RunOutput,
    path: &Path,
    text: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let w = s.limit.period().as_u64();
    let end = s.duration.as_u64();
    let xs: Vec<u64> = (0..=POINTS)
        .map(|i| end * i as u64 / POINTS as u64)
        .collect();
    let key0: Vec<_> = out.records.iter().filter(|r| r.key == 0).collect();
    let admitted: Vec<u64> = key0
        .iter()
        .filter(|r| r.served == Served::Allowed)
        .map(|r| r.at)
        .collect();
    let reference: Vec<u64> = key0.iter().filter(|r| r.reference).map(|r| r.at).collect();
    let total = trailing(&admitted, w, &xs);
    let single = trailing(&reference, w, &xs);
    let per_node: Vec<Vec<u64>> = if s.nodes <= 5 {
        (0..s.nodes as u16)
            .map(|n| {
                let t: Vec<u64> = key0
                    .iter()
                    .filter(|r| r.served == Served::Allowed && r.node == n)
                    .map(|r| r.at)
                    .collect();
                trailing(&t, w, &xs)
            })
            .collect()
    } else {
        Vec::new()
    };
    let quota = s.limit.quota() as f64;
    let (limit_line, envelope) = match s.limit.envelope() {
        Some((capacity, refill, _)) => (refill as f64, Some((capacity + refill) as f64)),
        None => (quota, None),
    };
    let peak = total
        .iter()
        .chain(&single)
        .copied()
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let ymax = (peak.max(envelope.unwrap_or(limit_line)) * 1.15).max(1.0);
    let secs = |ns: u64| ns as f64 / 1e9;
    let xmax = secs(end);

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(12);
    if text {
        builder
            .caption(
                format!(
                    "{}: admitted per {}s window, key {:?}",
                    s.name,
                    secs(w),
                    out.traffic.keys[0]
                ),
                ("sans-serif", 16),
            )
            .x_label_area_size(32)
            .y_label_area_size(56);
    }
    let mut chart = builder.build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .y_desc("admitted in window")
            .label_style(("sans-serif", 12))
            .draw()?;
    } else {
        chart.configure_mesh().x_labels(0).y_labels(0).draw()?;
    }
    let grey = RGBColor(225, 225, 225);
    chart.draw_series(
        bands(s)
            .into_iter()
            .map(|(a, b)| Rectangle::new([(a, 0.0), (b, ymax)], grey.filled())),
    )?;
    let line = |v: &[u64]| -> Vec<(f64, f64)> {
        xs.iter()
            .zip(v)
            .map(|(&x, &y)| (secs(x), y as f64))
            .collect()
    };
    let palette = [
        RGBColor(230, 159, 0),
        RGBColor(86, 180, 233),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(213, 94, 0),
    ];
    for (n, v) in per_node.iter().enumerate() {
        let c = palette[n % palette.len()];
        let series = chart.draw_series(LineSeries::new(line(v), c.stroke_width(1)))?;
        if text {
            series
                .label(format!("node {n}"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c));
        }
    }
    let red = RGBColor(200, 0, 0);
    let limit = chart.draw_series(LineSeries::new(
        [(0.0, limit_line), (xmax, limit_line)],
        red.stroke_width(2),
    ))?;
    if text {
        limit
            .label("limit")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], red));
    }
    if let Some(e) = envelope {
        let s2 = chart.draw_series(LineSeries::new([(0.0, e), (xmax, e)], red.stroke_width(1)))?;
        if text {
            s2.label("capacity + refill")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], red));
        }
    }
    let grey_line = RGBColor(120, 120, 120);
    let r = chart.draw_series(LineSeries::new(line(&single), grey_line.stroke_width(1)))?;
    if text {
        r.label("single-node reference")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], grey_line));
    }
    let r = chart.draw_series(LineSeries::new(line(&total), BLACK.stroke_width(2)))?;
    if text {
        r.label("cluster (all nodes)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_drawn_with_and_without_a_font() {
        let s = Scenario::from_toml(
            r#"
            name = "tiny"
            description = "d"
            nodes = 2
            duration = "2s"
            rules = '''
            [[rules]]
            name = "r"
            match = { user = "*" }
            limits = [ { algorithm = "sliding_window", limit = 50, window = "1s" } ]
            '''
            [[traffic]]
            keys = 1
            rate = 100
            [[faults]]
            at = "500ms"
            action = "crash"
            node = 1
            "#,
        )
        .unwrap();
        let out = crate::run::run(&s, 1).unwrap();
        let dir = std::env::temp_dir().join(format!("sim-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for text in [false, font()] {
            let path = dir.join(format!("tiny-{text}.png"));
            draw(&s, &out, &path, text).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "text = {text}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn trailing_counts_the_half_open_window() {
        let times = [1, 2, 3, 10];
        assert_eq!(trailing(&times, 5, &[0, 3, 6, 7, 10]), vec![0, 3, 2, 1, 1]);
    }
}
