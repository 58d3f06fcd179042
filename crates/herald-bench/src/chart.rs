//! The comparison chart: fan-out latency (p50 dashed, p99 solid) against offered deliveries per
//! second, one colour per server, both axes logarithmic, written as a small SVG by hand (no
//! font or plotting dependency). Points are medians over the runs at each offered rate; a
//! hollow point is a step the server did not sustain.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::compare::{median, servers};
use crate::report::RunReport;

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 500.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// One server's curve.
#[derive(Debug, Clone)]
pub struct Series {
    pub server: String,
    /// (offered deliveries/s, p50 ms, p99 ms, sustained in most runs)
    pub points: Vec<(f64, f64, f64, bool)>,
}

/// Median curves per server from the fan-out reports.
pub fn fanout_series(reports: &[RunReport]) -> Vec<Series> {
    servers(reports)
        .into_iter()
        .filter_map(|server| {
            let mut by_rate: BTreeMap<u64, Vec<&crate::report::Step>> = BTreeMap::new();
            for report in reports
                .iter()
                .filter(|r| r.server == server && r.scenario == "fanout")
            {
                for step in &report.steps {
                    by_rate
                        .entry(step.offered_deliveries_per_s.round() as u64)
                        .or_default()
                        .push(step);
                }
            }
            let points: Vec<_> = by_rate
                .into_iter()
                .filter_map(|(offered, steps)| {
                    let p50 = median(steps.iter().map(|s| s.latency_ms.p50).collect())?;
                    let p99 = median(steps.iter().map(|s| s.latency_ms.p99).collect())?;
                    let sustained = steps.iter().filter(|s| s.sustained).count() * 2 > steps.len();
                    Some((offered as f64, p50, p99, sustained))
                })
                .collect();
            (!points.is_empty()).then_some(Series { server, points })
        })
        .collect()
}

fn colour(index: usize, server: &str) -> &'static str {
    match server {
        "herald" => "#1f6fb4",
        "ws" => "#e8730c",
        "socketio" => "#2a9d3a",
        _ => ["#8e44ad", "#7f7f7f", "#c0392b"][index % 3],
    }
}

fn label(value: f64) -> String {
    if value >= 1e6 {
        format!("{}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{}k", value / 1e3)
    } else {
        format!("{value}")
    }
}

/// Decades spanning `lo..=hi` (both positive).
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    (
        10f64.powf(lo.max(1e-3).log10().floor()),
        10f64.powf(hi.max(lo * 10.0).log10().ceil()),
    )
}

/// The SVG document. `limit_ms` is drawn as a horizontal line (the p99 target).
pub fn svg(series: &[Series], limit_ms: f64, title: &str) -> String {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (f64::MAX, 0f64, f64::MAX, 0f64);
    for &(x, p50, p99, _) in all {
        x_lo = x_lo.min(x);
        x_hi = x_hi.max(x);
        y_lo = y_lo.min(p50.max(0.01));
        y_hi = y_hi.max(p99);
    }
    if x_hi == 0.0 {
        (x_lo, x_hi, y_lo, y_hi) = (1e3, 1e6, 0.1, 100.0);
    }
    let (x_lo, x_hi) = decades(x_lo, x_hi);
    let (y_lo, y_hi) = decades(y_lo.min(limit_ms), y_hi.max(limit_ms));
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_of = |x: f64| LEFT + (x.log10() - x_lo.log10()) / (x_hi.log10() - x_lo.log10()) * plot_w;
    let y_of = |y: f64| {
        TOP + plot_h - (y.max(y_lo).log10() - y_lo.log10()) / (y_hi.log10() - y_lo.log10()) * plot_h
    };

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/><text x="{LEFT}" y="28" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    // Grid and axis labels at each decade (and 2×, 5× within it for the x axis).
    let mut decade = x_lo;
    while decade <= x_hi * 1.0001 {
        for step in [1.0, 2.0, 5.0] {
            let x = decade * step;
            if x > x_hi * 1.0001 {
                break;
            }
            let px = x_of(x);
            let _ = writeln!(
                out,
                r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + plot_h,
                TOP + plot_h + 18.0,
                label(x)
            );
        }
        decade *= 10.0;
    }
    let mut decade = y_lo;
    while decade <= y_hi * 1.0001 {
        let py = y_of(decade);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 8.0,
            py + 4.0,
            label(decade)
        );
        decade *= 10.0;
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>"##
    );
    let limit_y = y_of(limit_ms);
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{limit_y:.1}" x2="{:.1}" y2="{limit_y:.1}" stroke="#c00" stroke-dasharray="2,3"/><text x="{:.1}" y="{:.1}" fill="#c00" text-anchor="end">p99 limit {limit_ms} ms</text>"##,
        LEFT + plot_w,
        LEFT + plot_w - 4.0,
        limit_y - 4.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">offered deliveries per second (log)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 15.0
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(22 {:.1}) rotate(-90)" text-anchor="middle">latency, ms (log): p99 solid, p50 dashed</text>"#,
        TOP + plot_h / 2.0
    );

    for (index, series) in series.iter().enumerate() {
        let colour = colour(index, &series.server);
        let path = |pick: fn(&(f64, f64, f64, bool)) -> f64| {
            series
                .points
                .iter()
                .map(|p| format!("{:.1},{:.1}", x_of(p.0), y_of(pick(p))))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            path(|p| p.2)
        );
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.2" stroke-dasharray="5,4"/>"#,
            path(|p| p.1)
        );
        for &(x, _, p99, sustained) in &series.points {
            let fill = if sustained { colour } else { "white" };
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{fill}" stroke="{colour}" stroke-width="1.5"/>"#,
                x_of(x),
                y_of(p99)
            );
        }
        let legend_y = TOP + 20.0 + index as f64 * 22.0;
        let legend_x = LEFT + plot_w + 16.0;
        let _ = writeln!(
            out,
            r#"<line x1="{legend_x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            legend_y - 4.0,
            legend_x + 24.0,
            legend_y - 4.0,
            legend_x + 30.0,
            legend_y,
            escape(&series.server)
        );
    }
    let legend_y = TOP + 20.0 + series.len() as f64 * 22.0 + 8.0;
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{legend_y:.1}" fill="#555">hollow: not sustained</text>"##,
        LEFT + plot_w + 16.0
    );
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_a_curve_and_a_legend_entry_per_server() {
        let series = vec![
            Series {
                server: "herald".into(),
                points: vec![(10_000.0, 0.5, 2.0, true), (100_000.0, 0.8, 9.0, true)],
            },
            Series {
                server: "ws".into(),
                points: vec![(10_000.0, 1.0, 4.0, true), (100_000.0, 40.0, 300.0, false)],
            },
        ];
        let svg = svg(&series, 50.0, "fanout <1k subscribers>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains(">herald<") && svg.contains(">ws<"));
        assert!(svg.contains("fanout &lt;1k subscribers&gt;"));
        assert!(
            svg.contains(r##"fill="white" stroke="#e8730c""##),
            "unsustained point is hollow"
        );
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }
}
