//! What the scenarios measure with: latency histograms, the CPU each
//! process spent, a progress line while a load runs, and the results
//! table (printed, and written as JSON).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies in microseconds, from 1 µs to 10 minutes, 3 significant digits.
#[derive(Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        self.0.saturating_record(latency.as_micros().max(1) as u64);
    }

    pub fn merge(&mut self, other: &Latencies) {
        self.0.add(&other.0).expect("histograms of the same bounds");
    }

    /// The `q` quantile (0.5 = the median) in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1e3
    }

    pub fn p50(&self) -> f64 {
        self.ms(0.5)
    }

    pub fn p99(&self) -> f64 {
        self.ms(0.99)
    }
}

/// CPU seconds spent so far by a process (user + system), from
/// `/proc/<pid>/stat`; 0 for a process that is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces; the fields after its
    // closing parenthesis are space-separated: utime is the 14th field.
    let Some((_, after)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12) + ticks(13) + ticks(14)) / per_second
}

/// Resident memory of a process in bytes (`VmRSS`), if it runs.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The pids of every PostgreSQL process on the machine (the benchmark's
/// own cluster, when it started one and none other runs).
pub fn postgres_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres"))
        .collect()
}

/// Who spent the machine's CPU during one phase: the benchmark's own
/// clients, the servers, PostgreSQL; as a share of one core.
pub struct CpuMeter {
    servers: Vec<u32>,
    started: Instant,
    before: [f64; 3],
}

/// CPU shares (1.0 = one core busy) over a phase.
#[derive(Clone, Copy, Serialize)]
pub struct CpuShares {
    pub client: f64,
    pub servers: f64,
    pub postgres: f64,
}

impl CpuMeter {
    pub fn start(servers: &[u32]) -> CpuMeter {
        CpuMeter {
            servers: servers.to_vec(),
            started: Instant::now(),
            before: Self::now(servers),
        }
    }

    fn now(servers: &[u32]) -> [f64; 3] {
        [
            cpu_seconds(std::process::id()),
            servers.iter().map(|&pid| cpu_seconds(pid)).sum(),
            postgres_pids().into_iter().map(cpu_seconds).sum(),
        ]
    }

    pub fn stop(&self) -> CpuShares {
        let after = Self::now(&self.servers);
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let share = |i: usize| ((after[i] - self.before[i]) / wall * 100.0).round() / 100.0;
        CpuShares {
            client: share(0),
            servers: share(1),
            postgres: share(2),
        }
    }
}

/// Prints `label: N unit (R/s)` to stderr every second until dropped.
pub struct Progress {
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(label: String, unit: &'static str, done: Arc<AtomicU64>) -> Progress {
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let n = done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                eprintln!("  {label}: {secs:>5.1} s, {n} {unit} ({:.0}/s)", n as f64 / secs);
            }
        });
        Progress { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One line of the results.
#[derive(Serialize)]
pub struct Row {
    pub scenario: String,
    pub measure: String,
    pub value: f64,
    pub unit: &'static str,
    /// The target, as text (`≥ 50 %`), if it sets one.
    pub target: Option<String>,
    pub met: Option<bool>,
    /// Where the machine's CPU went while it was measured.
    pub cpu: Option<CpuShares>,
}

/// Whether a value must be at least or at most its target.
#[derive(Clone, Copy)]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

pub struct Results {
    pub rows: Vec<Row>,
    /// Whether the targets apply (not to a smoke run's tiny sizes).
    judge: bool,
}

impl Results {
    pub fn new(judge: bool) -> Results {
        Results {
            rows: Vec::new(),
            judge,
        }
    }

    /// Adds a measurement (printed at once, so a long run shows its results as it goes).
    pub fn add(
        &mut self,
        scenario: impl Into<String>,
        measure: impl Into<String>,
        value: f64,
        unit: &'static str,
        goal: Option<Goal>,
        cpu: Option<CpuShares>,
    ) {
        let (target, met) = match goal {
            Some(Goal::AtLeast(t)) => (Some(format!("≥ {}", number(t))), Some(value >= t)),
            Some(Goal::AtMost(t)) => (Some(format!("≤ {}", number(t))), Some(value <= t)),
            None => (None, None),
        };
        let met = met.filter(|_| self.judge);
        let row = Row {
            scenario: scenario.into(),
            measure: measure.into(),
            value,
            unit,
            target,
            met,
            cpu,
        };
        eprintln!("  => {}", line(&row));
        self.rows.push(row);
    }

    /// The table, one measurement a line.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<42} {:<44} {:>12} {:<9} {:<12} {:<4} {}\n",
            "scenario", "measure", "value", "unit", "target", "met", "cpu (client/servers/postgres, cores)"
        );
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

fn line(row: &Row) -> String {
    let met = match row.met {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "",
    };
    let cpu = row
        .cpu
        .map(|c| format!("{:.2}/{:.2}/{:.2}", c.client, c.servers, c.postgres))
        .unwrap_or_default();
    format!(
        "{:<42} {:<44} {:>12} {:<9} {:<12} {:<4} {}",
        row.scenario,
        row.measure,
        number(row.value),
        row.unit,
        row.target.as_deref().unwrap_or(""),
        met,
        cpu
    )
}

/// A value as the table shows it: thousands grouped, decimals only where small.
pub fn number(v: f64) -> String {
    if v.abs() >= 100.0 {
        let n = v.round() as i64;
        let digits = n.abs().to_string();
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if n < 0 { format!("-{grouped}") } else { grouped }
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
