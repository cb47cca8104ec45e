//! Hand-written SVG charts for `perf/RESULTS.md`: lines (throughput against offered load,
//! latency against load) and grouped bars (latency percentiles). No plotting crate: a chart
//! is a few dozen elements, and plain SVG renders on GitHub and in any browser.

use std::fmt::Write as _;

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 56.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// One line of a [`LineChart`].
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Index into the palette, so related series share a colour.
    pub color: usize,
    pub dashed: bool,
}

#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub series: Vec<Series>,
}

/// Grouped bars: one group per label, one bar per series in each group.
#[derive(Debug, Clone)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub log_y: bool,
    pub groups: Vec<String>,
    /// (name, one value per group; `None` leaves a gap).
    pub series: Vec<(String, Vec<Option<f64>>)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `12000` -> `12k`, `2500000` -> `2.5M`, `0.5` -> `0.5`.
pub fn short(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let t = if x.fract().abs() < 1e-9 || x.abs() >= 10.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    };
    format!("{}{suffix}", t.trim_end_matches(".0"))
}

/// An axis: maps values to pixels and lists tick values.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, log: bool, from_zero: bool) -> Axis {
        let vals: Vec<f64> = values
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
            .collect();
        let (mut lo, mut hi) = vals
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if !lo.is_finite() {
            (lo, hi) = if log { (1.0, 10.0) } else { (0.0, 1.0) };
        }
        if log {
            lo = 10f64.powf(lo.log10().floor());
            hi = 10f64.powf(hi.log10().ceil());
            if hi <= lo {
                hi = lo * 10.0;
            }
        } else {
            if from_zero {
                lo = lo.min(0.0);
            }
            if hi <= lo {
                hi = lo + 1.0;
            }
            let step = nice_step((hi - lo) / 5.0);
            lo = (lo / step).floor() * step;
            hi = (hi / step).ceil() * step;
        }
        Axis { lo, hi, log }
    }

    /// Position in 0..=1 along the axis.
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            let v = v.max(self.lo);
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let mut t = Vec::new();
            let mut v = self.lo;
            while v <= self.hi * 1.0001 {
                t.push(v);
                v *= 10.0;
            }
            t
        } else {
            let step = nice_step((self.hi - self.lo) / 5.0);
            let mut t = Vec::new();
            let mut v = self.lo;
            while v <= self.hi + step * 1e-6 {
                t.push(v);
                v += step;
            }
            t
        }
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw.is_nan() || raw <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= raw {
            return m * p;
        }
    }
    10.0 * p
}

fn frame(out: &mut String, title: &str, x_label: &str, y_label: &str) {
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        (LEFT + W - RIGHT) / 2.0,
        esc(title),
        (LEFT + W - RIGHT) / 2.0,
        H - 14.0,
        esc(x_label),
        (TOP + H - BOTTOM) / 2.0,
        esc(y_label)
    );
}

fn y_grid(out: &mut String, y: &Axis) {
    let plot_h = H - TOP - BOTTOM;
    for t in y.ticks() {
        let py = H - BOTTOM - y.frac(t) * plot_h;
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            short(t)
        );
    }
    let _ = writeln!(
        out,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#444\"/>",
        W - LEFT - RIGHT
    );
}

fn legend(out: &mut String, entries: &[(String, usize, bool)]) {
    for (i, (name, color, dashed)) in entries.iter().enumerate() {
        let y = TOP + 10.0 + i as f64 * 20.0;
        let x = W - RIGHT + 14.0;
        let dash = if *dashed {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "<line x1=\"{x}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{}\" stroke-width=\"2.5\"{dash}/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            x + 26.0,
            COLORS[color % COLORS.len()],
            x + 32.0,
            y + 4.0,
            esc(name)
        );
    }
}

impl LineChart {
    pub fn render(&self) -> String {
        let mut out = String::new();
        frame(&mut out, &self.title, &self.x_label, &self.y_label);
        let pts = || self.series.iter().flat_map(|s| s.points.iter());
        let x = Axis::new(pts().map(|p| p.0), false, true);
        let y = Axis::new(pts().map(|p| p.1), self.log_y, true);
        y_grid(&mut out, &y);
        let plot_w = W - LEFT - RIGHT;
        let plot_h = H - TOP - BOTTOM;
        for t in x.ticks() {
            let px = LEFT + x.frac(t) * plot_w;
            let _ = writeln!(
                out,
                "<line x1=\"{px:.1}\" y1=\"{}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"#444\"/>\
                 <text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                H - BOTTOM,
                H - BOTTOM + 5.0,
                H - BOTTOM + 19.0,
                short(t)
            );
        }
        for s in &self.series {
            let color = COLORS[s.color % COLORS.len()];
            let coords: Vec<String> = s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite() && (!self.log_y || p.1 > 0.0))
                .map(|p| {
                    format!(
                        "{:.1},{:.1}",
                        LEFT + x.frac(p.0) * plot_w,
                        H - BOTTOM - y.frac(p.1) * plot_h
                    )
                })
                .collect();
            if coords.is_empty() {
                continue;
            }
            let dash = if s.dashed {
                " stroke-dasharray=\"6 4\""
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2.5\"{dash}/>",
                coords.join(" ")
            );
            for c in &coords {
                let (cx, cy) = c.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    out,
                    "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3.5\" fill=\"{color}\"/>"
                );
            }
        }
        let entries: Vec<(String, usize, bool)> = self
            .series
            .iter()
            .map(|s| (s.name.clone(), s.color, s.dashed))
            .collect();
        legend(&mut out, &entries);
        out += "</svg>\n";
        out
    }
}

impl BarChart {
    pub fn render(&self) -> String {
        let mut out = String::new();
        frame(&mut out, &self.title, "", &self.y_label);
        let y = Axis::new(
            self.series
                .iter()
                .flat_map(|s| s.1.iter().flatten().copied()),
            self.log_y,
            true,
        );
        y_grid(&mut out, &y);
        let plot_w = W - LEFT - RIGHT;
        let plot_h = H - TOP - BOTTOM;
        let groups = self.groups.len().max(1) as f64;
        let group_w = plot_w / groups;
        let bars = self.series.len().max(1) as f64;
        let bar_w = group_w * 0.8 / bars;
        let base = if self.log_y { y.lo } else { 0f64.max(y.lo) };
        for (g, label) in self.groups.iter().enumerate() {
            let gx = LEFT + g as f64 * group_w;
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                gx + group_w / 2.0,
                H - BOTTOM + 18.0,
                esc(label)
            );
            for (k, (_, values)) in self.series.iter().enumerate() {
                let Some(v) = values.get(g).copied().flatten() else {
                    continue;
                };
                if self.log_y && v <= 0.0 {
                    continue;
                }
                let top = H - BOTTOM - y.frac(v) * plot_h;
                let bottom = H - BOTTOM - y.frac(base) * plot_h;
                let x0 = gx + group_w * 0.1 + k as f64 * bar_w;
                let _ = writeln!(
                    out,
                    "<rect x=\"{x0:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\">\
                     <title>{}</title></rect>",
                    bar_w * 0.92,
                    (bottom - top).max(0.5),
                    COLORS[k % COLORS.len()],
                    short(v)
                );
            }
        }
        let entries: Vec<(String, usize, bool)> = self
            .series
            .iter()
            .enumerate()
            .map(|(k, s)| (s.0.clone(), k, false))
            .collect();
        legend(&mut out, &entries);
        out += "</svg>\n";
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_numbers() {
        assert_eq!(short(0.0), "0");
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(150.0), "150");
        assert_eq!(short(12_000.0), "12k");
        assert_eq!(short(2_500_000.0), "2.5M");
        assert_eq!(short(1_000_000.0), "1M");
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(17.0), 20.0);
        assert_eq!(nice_step(40_000.0), 50_000.0);
        assert_eq!(nice_step(0.0), 1.0);
    }

    #[test]
    fn axes_cover_the_data() {
        let a = Axis::new([3.0, 97.0].into_iter(), false, true);
        assert_eq!((a.lo, a.hi), (0.0, 100.0));
        assert_eq!(a.ticks(), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let l = Axis::new([42.0, 3_100.0].into_iter(), true, true);
        assert_eq!((l.lo, l.hi), (10.0, 10_000.0));
        assert_eq!(l.ticks().len(), 4);
        assert!((l.frac(100.0) - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn line_chart_is_well_formed_svg() {
        let c = LineChart {
            title: "throughput <vs> load".into(),
            x_label: "offered".into(),
            y_label: "delivered".into(),
            log_y: false,
            series: vec![
                Series {
                    name: "a & b".into(),
                    points: vec![(0.0, 0.0), (100.0, 90.0)],
                    color: 0,
                    dashed: false,
                },
                Series {
                    name: "ideal".into(),
                    points: vec![(0.0, 0.0), (100.0, 100.0)],
                    color: 1,
                    dashed: true,
                },
            ],
        };
        let s = c.render();
        assert!(s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(s.trim_end().ends_with("</svg>"));
        assert!(s.contains("throughput &lt;vs&gt; load"));
        assert!(s.contains("a &amp; b"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert_eq!(s.matches("<circle").count(), 4);
        assert!(s.contains("stroke-dasharray"));
        // The highest point sits on the top edge of the plot, the origin on the corner.
        assert!(s.contains(&format!("{:.1},{:.1}", W - RIGHT, TOP)), "{s}");
        assert!(s.contains(&format!("{LEFT:.1},{:.1}", H - BOTTOM)));
    }

    #[test]
    fn bar_chart_skips_missing_values() {
        let c = BarChart {
            title: "latency".into(),
            y_label: "µs".into(),
            log_y: true,
            groups: vec!["p50".into(), "p99".into()],
            series: vec![
                ("a".into(), vec![Some(50.0), Some(900.0)]),
                ("b".into(), vec![None, Some(2000.0)]),
            ],
        };
        let s = c.render();
        assert_eq!(
            s.matches("<rect x=").count(),
            3 + 1,
            "three bars and the plot frame"
        );
        assert!(s.contains("<title>2k</title>"));
    }
}
