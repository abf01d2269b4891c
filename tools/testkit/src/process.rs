//! The `courier` binary as a child process, for what an in-process courier cannot show: kill -9,
//! the CLI, exit codes, and memory and CPU as the operating system counts them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to start courier: `<exe> [global args] run --config <dir>/<file>`.
#[derive(Clone, Debug)]
pub struct Launch {
    exe: PathBuf,
    dir: PathBuf,
    config: String,
    config_file: Option<String>,
    global_args: Vec<String>,
    env: Vec<(String, String)>,
    rust_log: String,
    inherit_stderr: bool,
    sample_memory: bool,
}

impl Launch {
    /// The binary at `exe` with the configuration text `config`, written into `dir`. By default
    /// its stderr goes to a log file in `dir`, with `RUST_LOG=info`.
    pub fn new(exe: impl AsRef<Path>, dir: impl AsRef<Path>, config: impl Into<String>) -> Launch {
        Launch {
            exe: exe.as_ref().to_path_buf(),
            dir: dir.as_ref().to_path_buf(),
            config: config.into(),
            config_file: None,
            global_args: Vec::new(),
            env: Vec::new(),
            rust_log: "info".into(),
            inherit_stderr: false,
            sample_memory: false,
        }
    }

    /// The config file's name in the directory (by default a unique one, so that several
    /// processes can share a directory).
    pub fn config_file(mut self, name: &str) -> Self {
        self.config_file = Some(name.into());
        self
    }

    /// An argument before the `run` subcommand, such as `--log-format`.
    pub fn global_arg(mut self, arg: &str) -> Self {
        self.global_args.push(arg.into());
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = filter.into();
        self
    }

    /// courier's stderr goes to this process's stderr instead of a log file.
    pub fn inherit_stderr(mut self) -> Self {
        self.inherit_stderr = true;
        self
    }

    /// Samples the resident set every 20 ms for [`CourierProcess::peak_rss_kib`], and notices
    /// an exit for [`CourierProcess::exited`]. Needs a tokio runtime.
    pub fn sample_memory(mut self) -> Self {
        self.sample_memory = true;
        self
    }

    pub fn spawn(self) -> CourierProcess {
        let name = self
            .config_file
            .clone()
            .unwrap_or_else(|| format!("{}.toml", crate::unique("courier")));
        let config = self.dir.join(name);
        std::fs::write(&config, &self.config).expect("write config");
        let mut command = Command::new(&self.exe);
        command
            .args(&self.global_args)
            .args(["run", "--config"])
            .arg(&config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", &self.rust_log)
            .stdout(Stdio::null());
        let log = if self.inherit_stderr {
            command.stderr(Stdio::inherit());
            None
        } else {
            let log = self.dir.join(format!("{}.log", crate::unique("courier")));
            command.stderr(std::fs::File::create(&log).expect("log file"));
            Some(log)
        };
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.exe.display()));
        let sampler = self.sample_memory.then(|| Sampler::start(child.id()));
        CourierProcess {
            child,
            log,
            sampler,
        }
    }
}

/// Peak RSS and liveness, sampled by a task.
struct Sampler {
    peak_kib: Arc<AtomicU64>,
    exited: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let exited = Arc::new(AtomicBool::new(false));
        let (p, e) = (peak_kib.clone(), exited.clone());
        let task = tokio::spawn(async move {
            loop {
                match status_kib(pid, "VmRSS:") {
                    Some(k) => {
                        p.fetch_max(k, Ordering::Relaxed);
                    }
                    // An exited process (a zombie until reaped) has no VmRSS line.
                    None => e.store(true, Ordering::Relaxed),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Sampler {
            peak_kib,
            exited,
            task,
        }
    }
}

/// A running courier process; killed (SIGKILL) when dropped.
pub struct CourierProcess {
    pub child: Child,
    /// Where its stderr goes, unless inherited.
    log: Option<PathBuf>,
    sampler: Option<Sampler>,
}

impl CourierProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file its stderr goes to.
    pub fn log(&self) -> &Path {
        self.log
            .as_deref()
            .expect("courier's stderr goes to a log file (not Launch::inherit_stderr)")
    }

    /// Asks for a graceful stop, as an orchestrator does; returns at once, with whether the
    /// signal was sent.
    pub fn sigterm(&self) -> bool {
        Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Sends SIGHUP (courier loads its configuration file again); returns whether it was sent.
    pub fn sighup(&self) -> bool {
        Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits for the process to exit; `None` if it still runs after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `within`.
    pub async fn stop(mut self, within: Duration) {
        if let Some(sampler) = &self.sampler {
            sampler.task.abort();
        }
        if self.sigterm() {
            self.wait_exit(within).await;
        }
    }

    /// SIGKILL: no drain, no flush, no PUBACK. Returns what it logged.
    pub fn kill9(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log
            .as_ref()
            .and_then(|log| std::fs::read_to_string(log).ok())
            .unwrap_or_default()
    }

    /// Whether the memory sampler saw it exit (a config error, a crash).
    pub fn exited(&self) -> bool {
        self.sampler
            .as_ref()
            .is_some_and(|s| s.exited.load(Ordering::Relaxed))
    }

    /// User plus system CPU seconds it has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid()).unwrap_or(0.0)
    }

    /// Its resident set now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:").unwrap_or(0)
    }

    /// The largest resident set it had, in KiB: the sampler's peak or the kernel's high-water
    /// mark, whichever is larger.
    pub fn peak_rss_kib(&self) -> u64 {
        self.sampler
            .as_ref()
            .map_or(0, |s| s.peak_kib.load(Ordering::Relaxed))
            .max(status_kib(self.pid(), "VmHWM:").unwrap_or(0))
    }
}

impl Drop for CourierProcess {
    fn drop(&mut self) {
        if let Some(sampler) = &self.sampler {
            sampler.task.abort();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/<pid>/status` field in KiB, such as `VmRSS:`.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User plus system CPU seconds a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing paren are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

/// The unit of `/proc/<pid>/stat`'s CPU times (100 on Linux unless the kernel says otherwise).
fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|t| t.trim().parse::<f64>().ok())
            .filter(|&hz| hz > 0.0)
            .unwrap_or(100.0)
    })
}
