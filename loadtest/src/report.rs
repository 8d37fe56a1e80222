//! Result table / one-line JSON, and the optional SVG latency plot.

use std::io::IsTerminal;

use hdrhistogram::Histogram;
use serde_json::{Map, Value};

use crate::sys::ProcSnap;

pub struct Report {
    mode: &'static str,
    rows: Vec<(String, Value, String)>,
    notes: Vec<String>,
}

/// The start of a message, at most `max` bytes, for error texts.
pub fn snippet(b: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&b[..b.len().min(max)]).into_owned()
}

/// Counts a failed call and keeps the text of the first one for the report.
pub fn count_error(errors: &mut u64, first: &mut Option<String>, msg: &[u8], max: usize) {
    *errors += 1;
    if first.is_none() {
        *first = Some(snippet(msg, max));
    }
}

impl Report {
    pub fn new(mode: &'static str) -> Report {
        Report {
            mode,
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// `key` is the JSON key; `human` the table cell.
    pub fn add(&mut self, key: &str, value: impl Into<Value>, human: impl Into<String>) {
        self.rows
            .push((key.to_string(), value.into(), human.into()));
    }

    pub fn num(&mut self, key: &str, v: f64, decimals: usize, unit: &str) {
        let r = (v * 10f64.powi(decimals as i32)).round() / 10f64.powi(decimals as i32);
        let value = if r.is_finite() {
            Value::from(r)
        } else {
            Value::Null
        };
        let human = if unit.is_empty() {
            format!("{r:.decimals$}")
        } else {
            format!("{r:.decimals$} {unit}")
        };
        self.add(key, value, human);
    }

    /// `amount` per second over `secs` (guarded against a zero window).
    pub fn rate(&mut self, key: &str, amount: f64, secs: f64, decimals: usize, unit: &str) {
        self.num(key, amount / secs.max(1e-9), decimals, unit);
    }

    pub fn int(&mut self, key: &str, v: u64) {
        self.add(key, v, group_digits(v));
    }

    /// The value recorded under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.rows.iter().find(|(k, _, _)| k == key).map(|(_, v, _)| v)
    }

    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// Latency percentiles in microseconds under `prefix_*`.
    pub fn latency(&mut self, prefix: &str, h: &Histogram<u64>) {
        self.int(&format!("{prefix}_samples"), h.len());
        if h.is_empty() {
            return;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)] {
            self.num(
                &format!("{prefix}_{name}_us"),
                us(h.value_at_quantile(q)),
                1,
                "µs",
            );
        }
        self.num(&format!("{prefix}_max_us"), us(h.max()), 1, "µs");
        self.num(&format!("{prefix}_mean_us"), h.mean() / 1000.0, 1, "µs");
    }

    /// A "CPU nanoseconds per unit of work" row, when any work was done.
    pub fn per_unit_cpu(&mut self, key: &str, cpu_s: f64, units: u64, unit: &str) {
        if units > 0 {
            self.num(key, cpu_s * 1e9 / units as f64, 0, unit);
        }
    }

    /// The engine's RSS at both ends of the run and its CPU over `secs` (and per `per.1` when
    /// `per.0` of them were done), when both snapshots were read.
    pub fn server_rows(
        &mut self,
        start: Option<ProcSnap>,
        end: Option<ProcSnap>,
        secs: f64,
        per: Option<(u64, &str)>,
    ) {
        let (Some(a), Some(b)) = (start, end) else {
            return;
        };
        self.num("server_rss_start_mb", a.rss_kb as f64 / 1024.0, 1, "MiB");
        self.num("server_rss_end_mb", b.rss_kb as f64 / 1024.0, 1, "MiB");
        let cpu = b.cpu_secs - a.cpu_secs;
        self.num("server_cpu_s", cpu, 2, "s");
        self.rate("server_cpu_cores", cpu, secs, 2, "cores");
        if let Some((n, what)) = per {
            if n > 0 {
                self.num(
                    &format!("server_cpu_ns_per_{what}"),
                    cpu * 1e9 / n as f64,
                    0,
                    "ns",
                );
            }
        }
    }

    pub fn print(&self, json: bool) {
        if json {
            let mut m = Map::new();
            m.insert("mode".into(), Value::from(self.mode));
            for (k, v, _) in &self.rows {
                m.insert(k.clone(), v.clone());
            }
            if !self.notes.is_empty() {
                m.insert("notes".into(), Value::from(self.notes.clone()));
            }
            println!("{}", Value::Object(m));
            return;
        }
        println!("ringcast-loadtest {}", self.mode);
        let w = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
        for (k, _, h) in &self.rows {
            println!("  {k:<w$}  {h}");
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
    }
}

pub fn group_digits(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('_');
        }
        out.push(c);
    }
    out
}

/// A live status line on stderr (carriage-return refreshed on a terminal, one line per tick
/// otherwise).
pub struct Progress {
    tty: bool,
    active: bool,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            active: false,
        }
    }
    pub fn line(&mut self, s: &str) {
        if self.tty {
            eprint!("\r{s:<100}");
            self.active = true;
        } else {
            eprintln!("{s}");
        }
    }
    pub fn done(&mut self) {
        if self.tty && self.active {
            eprintln!();
            self.active = false;
        }
    }
}

/// Writes a latency-by-percentile plot (log "nines" x axis, log latency y axis) as SVG.
pub fn plot_svg(path: &std::path::Path, title: &str, h: &Histogram<u64>) -> std::io::Result<()> {
    let (w, ht, l, r, t, b) = (800.0, 480.0, 70.0, 20.0, 40.0, 50.0);
    let pw = w - l - r;
    let ph = ht - t - b;
    // x: log10(1/(1-q)), q from 0 to 0.99999 → 0..5
    let xmax = 5.0f64;
    let lo = (h.min().max(1) as f64).log10().floor();
    let hi = (h.max().max(10) as f64).log10().ceil().max(lo + 1.0);
    let x = |q: f64| l + pw * ((1.0 / (1.0 - q.min(0.99999))).log10() / xmax);
    let y = |ns: u64| t + ph * (1.0 - (((ns.max(1) as f64).log10() - lo) / (hi - lo)));
    let mut pts = String::new();
    let mut q = 0.0;
    while q <= 0.99999 {
        let v = h.value_at_quantile(q);
        pts.push_str(&format!("{:.1},{:.1} ", x(q), y(v)));
        q = 1.0 - (1.0 - q) * 0.93;
        if q < 0.01 {
            q = 0.01;
        }
    }
    pts.push_str(&format!("{:.1},{:.1}", x(0.99999), y(h.max())));
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{ht}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{}</text><rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##,
        w / 2.0,
        xml_escape(title)
    );
    for (i, lbl) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let xx = l + pw * i as f64 / xmax;
        s.push_str(&format!(
            r##"<line x1="{xx:.1}" y1="{t}" x2="{xx:.1}" y2="{}" stroke="#ddd"/><text x="{xx:.1}" y="{}" text-anchor="middle">{lbl}</text>"##,
            t + ph,
            t + ph + 18.0
        ));
    }
    let mut e = lo;
    while e <= hi {
        let ns = 10f64.powf(e) as u64;
        let yy = y(ns);
        let lbl = if ns >= 1_000_000_000 {
            format!("{}s", ns / 1_000_000_000)
        } else if ns >= 1_000_000 {
            format!("{}ms", ns / 1_000_000)
        } else if ns >= 1000 {
            format!("{}µs", ns / 1000)
        } else {
            format!("{ns}ns")
        };
        s.push_str(&format!(
            r##"<line x1="{l}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{lbl}</text>"##,
            l + pw,
            l - 6.0,
            yy + 4.0
        ));
        e += 1.0;
    }
    s.push_str(&format!(
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{pts}"/><text x="{}" y="{}" text-anchor="middle">percentile</text></svg>"##,
        l + pw / 2.0,
        ht - 8.0
    ));
    std::fs::write(path, s)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(r: &Report) -> Vec<(&str, &str)> {
        r.rows
            .iter()
            .map(|(k, _, h)| (k.as_str(), h.as_str()))
            .collect()
    }

    #[test]
    fn per_unit_cpu_only_when_work_was_done() {
        let mut r = Report::new("t");
        r.per_unit_cpu("cpu_ns_per_call", 1.5, 0, "ns");
        assert!(r.rows.is_empty());
        r.per_unit_cpu("cpu_ns_per_call", 1.5, 3, "ns");
        assert_eq!(keys(&r), [("cpu_ns_per_call", "500000000 ns")]);
    }

    #[test]
    fn server_rows_need_both_snapshots() {
        let a = ProcSnap {
            rss_kb: 2048,
            cpu_secs: 1.0,
        };
        let b = ProcSnap {
            rss_kb: 4096,
            cpu_secs: 3.0,
        };
        let mut r = Report::new("t");
        r.server_rows(Some(a), None, 2.0, Some((4, "call")));
        assert!(r.rows.is_empty());
        r.server_rows(Some(a), Some(b), 4.0, Some((4, "call")));
        assert_eq!(
            keys(&r),
            [
                ("server_rss_start_mb", "2.0 MiB"),
                ("server_rss_end_mb", "4.0 MiB"),
                ("server_cpu_s", "2.00 s"),
                ("server_cpu_cores", "0.50 cores"),
                ("server_cpu_ns_per_call", "500000000 ns"),
            ]
        );
        let mut r = Report::new("t");
        r.server_rows(Some(a), Some(b), 4.0, None);
        assert_eq!(r.rows.len(), 4);
    }
}
