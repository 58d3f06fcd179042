//! What `/proc` says about a process: CPU time (user + system, all threads) and resident memory,
//! and the machine's load average. Server CPU time per delivery is the figure that survives a
//! noisy machine best, so every result carries it. A server may be several processes (nodes
//! sharing Redis, and Redis itself): [`Procs`] sums their CPU time and memory.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read /proc/{pid}/{file}")]
    Read {
        pid: String,
        file: &'static str,
        source: std::io::Error,
    },
    #[error("unexpected format in /proc/{pid}/{file}")]
    Format { pid: String, file: &'static str },
}

/// A process to observe: a pid, or this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    Pid(u32),
    Myself,
}

impl Proc {
    fn dir(self) -> String {
        match self {
            Proc::Pid(pid) => pid.to_string(),
            Proc::Myself => "self".to_owned(),
        }
    }

    fn read(self, file: &'static str) -> Result<String, ProcError> {
        let pid = self.dir();
        std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|source| ProcError::Read {
            pid,
            file,
            source,
        })
    }

    /// User plus system CPU time of every thread of the process so far.
    pub fn cpu_time(self) -> Result<Duration, ProcError> {
        let stat = self.read("stat")?;
        let format = || ProcError::Format {
            pid: self.dir(),
            file: "stat",
        };
        // The command name (field 2) may hold spaces; fields after it are plain numbers.
        let after_name = stat.rsplit_once(')').ok_or_else(format)?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // Field 14 (utime) and 15 (stime), counted from field 3 (state) at index 0.
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let total = ticks(11).zip(ticks(12)).ok_or_else(format)?;
        Ok(Duration::from_secs_f64(
            (total.0 + total.1) as f64 / clock_ticks_per_second(),
        ))
    }

    /// Resident set size in bytes (`VmRSS`).
    pub fn rss_bytes(self) -> Result<u64, ProcError> {
        let status = self.read("status")?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| ProcError::Format {
                pid: self.dir(),
                file: "status",
            })
    }

    /// File descriptors the process holds open (sockets included).
    pub fn open_files(self) -> Result<usize, ProcError> {
        let pid = self.dir();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|entries| entries.count())
            .map_err(|source| ProcError::Read {
                pid,
                file: "fd",
                source,
            })
    }

    /// The command name, to check that a pid is the server one meant.
    pub fn command(self) -> Result<String, ProcError> {
        Ok(self.read("comm")?.trim().to_owned())
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// CPUs this process may run on (its affinity mask, so `taskset` counts).
pub fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Processes observed as one server: CPU time, memory and open files are summed over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Procs(Vec<Proc>);

impl Procs {
    /// `None` for an empty list: there is nothing to observe.
    pub fn new(procs: Vec<Proc>) -> Option<Self> {
        (!procs.is_empty()).then_some(Procs(procs))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each process's CPU time so far, in the order given.
    pub fn cpu_times(&self) -> Result<Vec<Duration>, ProcError> {
        self.0.iter().map(|proc| proc.cpu_time()).collect()
    }

    pub fn rss_bytes(&self) -> Result<u64, ProcError> {
        self.0.iter().map(|proc| proc.rss_bytes()).sum()
    }

    pub fn open_files(&self) -> Result<usize, ProcError> {
        self.0.iter().map(|proc| proc.open_files()).sum()
    }

    /// The command names, comma-separated.
    pub fn command(&self) -> Result<String, ProcError> {
        let names: Vec<String> = self
            .0
            .iter()
            .map(|proc| proc.command())
            .collect::<Result<_, _>>()?;
        Ok(names.join(","))
    }
}

impl From<Proc> for Procs {
    fn from(proc: Proc) -> Self {
        Procs(vec![proc])
    }
}

/// CPU time and wall time of some processes between two instants.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    procs: Procs,
    cpu: Vec<Duration>,
    wall: std::time::Instant,
}

impl CpuMeter {
    pub fn start(procs: impl Into<Procs>) -> Result<Self, ProcError> {
        let procs = procs.into();
        Ok(CpuMeter {
            cpu: procs.cpu_times()?,
            procs,
            wall: std::time::Instant::now(),
        })
    }

    /// CPU time used since `start` by all the processes together, and the share of one core it
    /// was (1.0 = one full core).
    pub fn read(&self) -> Result<(Duration, f64), ProcError> {
        let usage = self.usage()?;
        Ok((usage.total(), usage.cores()))
    }

    /// CPU time used since `start` by each process, and the wall time since `start`.
    pub fn usage(&self) -> Result<CpuUsage, ProcError> {
        let each = self
            .procs
            .cpu_times()?
            .into_iter()
            .zip(&self.cpu)
            .map(|(now, before)| now.saturating_sub(*before))
            .collect();
        Ok(CpuUsage {
            each,
            wall: self.wall.elapsed(),
        })
    }
}

/// What [`CpuMeter::usage`] read.
#[derive(Debug, Clone)]
pub struct CpuUsage {
    /// Per process, in the order given.
    pub each: Vec<Duration>,
    pub wall: Duration,
}

impl CpuUsage {
    pub fn total(&self) -> Duration {
        self.each.iter().sum()
    }

    /// The share of one core the processes used together.
    pub fn cores(&self) -> f64 {
        self.total().as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// Each process's CPU time, only when there are several (one would repeat the total).
    pub fn several(&self) -> Option<&[Duration]> {
        (self.each.len() > 1).then_some(self.each.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let start = CpuMeter::start(Proc::Myself).unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(Proc::Myself.rss_bytes().unwrap() > 0);
        let (cpu, share) = start.read().unwrap();
        assert!(cpu <= Duration::from_secs(60) && share >= 0.0);
        assert!(load_average().is_some());
    }

    #[test]
    fn several_processes_add_up() {
        let myself = Proc::Pid(std::process::id());
        let twice = Procs::new(vec![myself, myself]).unwrap();
        assert_eq!(twice.len(), 2);
        let meter = CpuMeter::start(twice.clone()).unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let usage = meter.usage().unwrap();
        let each = usage.several().unwrap();
        assert_eq!(each.len(), 2);
        assert_eq!(usage.total(), each[0] + each[1]);
        assert!(
            CpuMeter::start(myself)
                .unwrap()
                .usage()
                .unwrap()
                .several()
                .is_none()
        );
        let files = myself.open_files().unwrap();
        assert!(twice.open_files().unwrap() >= files);
        assert!(twice.rss_bytes().unwrap() > myself.rss_bytes().unwrap() / 2 * 3);
        assert_eq!(Procs::new(Vec::new()), None);
    }

    #[test]
    fn a_missing_process_is_a_clear_error() {
        let error = Proc::Pid(u32::MAX).cpu_time().unwrap_err();
        assert!(
            error.to_string().contains("/proc/4294967295/stat"),
            "{error}"
        );
    }
}
