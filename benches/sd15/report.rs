//! The machine and versions, and the one table (ours, each peer, ratios) as Markdown.

use std::fmt::Write as _;

use super::peers::Peer;

/// Min and median of some runs, or one value (GB rows).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    /// Fastest.
    pub min: f64,
    /// Median.
    pub median: f64,
}

impl Stat {
    /// Min and median of `values` (None when empty).
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Self { min: v[0], median })
    }

    /// One value as both.
    pub fn one(value: f64) -> Self {
        Self { min: value, median: value }
    }
}

/// What a row measures in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Seconds.
    Seconds,
    /// Gigabytes (10^9 bytes).
    Gb,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub what: String,
    /// Seconds or GB.
    pub unit: Unit,
    /// Ours, if measured.
    pub ours: Option<Stat>,
    /// The peak RSS of our process for this row, GB.
    pub ours_rss: Option<f64>,
    /// Our process's CPU time over its timed runs / (wall time × threads), and the machine's busy
    /// fraction meanwhile.
    pub ours_cpu_share: Option<(f64, f64)>,
    /// Each peer column's value, if it measured this row.
    pub peers: Vec<(Peer, Stat)>,
}

/// The CPU: model name, family/model, threads, and the vector extensions that matter here.
pub fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let Some(name) = field("model name") else { return std::env::consts::ARCH.to_string() };
    let flags = field("flags").unwrap_or_default();
    let has: Vec<&str> = flags.split_whitespace().collect();
    let exts: Vec<&str> = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"]
        .into_iter()
        .filter(|f| has.contains(f))
        .collect();
    let cpus = info.lines().filter(|l| l.starts_with("processor")).count();
    let family = match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!(", family {f} model {m}"),
        _ => String::new(),
    };
    let no512 = if has.contains(&"avx512f") { "" } else { ", no AVX-512" };
    format!("{name}{family}, {cpus} CPUs, {}{no512}", exts.join(" "))
}

/// Whether the CPU has bf16 dot products (avx512_bf16 or AMX); true where /proc/cpuinfo cannot tell.
pub fn has_native_bf16() -> bool {
    match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(info) => info.split_whitespace().any(|f| f == "avx512_bf16" || f == "amx_bf16"),
        Err(_) => true,
    }
}

/// Total memory, from /proc/meminfo.
pub fn memory_description() -> Option<String> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = info.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(format!("{:.0} GB RAM", kb / 1e6))
}

/// The version of `package` in the Cargo.lock the bench was built with.
pub fn locked_version(package: &str) -> String {
    let lock = include_str!("../../Cargo.lock");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == format!("name = \"{package}\"")
            && let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = \""))
        {
            return v.trim_end_matches('"').to_string();
        }
    }
    "?".into()
}

/// `rustc -V`, or "rustc ?".
pub fn rustc_version() -> String {
    std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-V")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rustc ?".into())
}

/// Today's date (UTC) as YYYY-MM-DD.
pub fn today() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn value(unit: Unit, v: f64) -> String {
    match unit {
        Unit::Seconds if v.abs() < 10.0 => format!("{v:.2} s"),
        Unit::Seconds => format!("{v:.1} s"),
        Unit::Gb => format!("{v:.2} GB"),
    }
}

/// The table as Markdown: what, ours (min / median), our process's peak RSS, CPU share (ours / the
/// machine's busy fraction), then for each peer
/// column its median and the ratio ours/peer (of the medians; > 1 means we are slower or larger).
pub fn table(rows: &[Row], columns: &[Peer]) -> String {
    let mut out = String::new();
    let mut header = "| what | diffctl min / median | diffctl peak RSS | CPU ours / machine |".to_string();
    let mut rule = "|---|---|---|---|".to_string();
    for peer in columns {
        let _ = write!(header, " {} (ours/peer) |", peer.title());
        rule.push_str("---|");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for row in rows {
        let ours = match (row.ours, row.unit) {
            (Some(s), Unit::Gb) => value(Unit::Gb, s.median),
            (Some(s), unit) => format!("{} / {}", value(unit, s.min), value(unit, s.median)),
            (None, _) => "—".into(),
        };
        let rss = row.ours_rss.map_or("—".into(), |g| value(Unit::Gb, g));
        let share = row.ours_cpu_share.map_or("—".into(), |(o, m)| format!("{:.0} / {:.0} %", 100.0 * o, 100.0 * m));
        let mut line = format!("| {} | {ours} | {rss} | {share} |", row.what);
        for peer in columns {
            let cell = match (row.peers.iter().find(|(p, _)| p == peer), row.ours) {
                (Some((_, p)), Some(o)) => format!("{} ({:.2})", value(row.unit, p.median), o.median / p.median),
                (Some((_, p)), None) => value(row.unit, p.median),
                (None, _) => "—".into(),
            };
            let _ = write!(line, " {cell} |");
        }
        let _ = writeln!(out, "{line}");
    }
    out
}
