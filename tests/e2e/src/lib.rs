//! Harness for the end-to-end tests: certificates made at test time, free loopback
//! ports, the real `sluice-relay` and `sluice-agent` binaries as child processes, the
//! services `scripts/test` started (tansu, moto), and the independent Python readers.
//!
//! Configs are the real config types (`sluice_relay::config`, `sluice_agent::config`),
//! built with test defaults by [`RelaySpec`] and [`AgentSpec`], tweaked by the test as
//! plain struct fields, and written with `toml::to_string`; [`Relay`] and [`Agent`] are
//! the running binaries, with their metrics and their lives (kill -9, restart, stop).
//!
//! Waiting is always on a condition with a deadline ([`wait_for`]), never a bare sleep.

mod agent;
mod lives;
mod relay;

pub use agent::*;
pub use lives::Lives;
pub use relay::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Addresses of the services `scripts/test` started.
pub struct Services {
    pub kafka: String,
    pub s3_endpoint: String,
    pub python: PathBuf,
    pub py_dir: PathBuf,
}

impl Services {
    /// Panics with instructions when the tests run outside `scripts/test`.
    pub fn from_env() -> Services {
        let get = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| {
                panic!("{k} is not set: run the end-to-end tests through scripts/test, which starts tansu and moto and sets it")
            })
        };
        Services {
            kafka: get("SLUICE_TEST_KAFKA"),
            s3_endpoint: get("SLUICE_TEST_S3_ENDPOINT"),
            python: get("SLUICE_TEST_PYTHON").into(),
            py_dir: get("SLUICE_TEST_PY_DIR").into(),
        }
    }

    /// Runs one of the tests/py helpers and parses the JSON object it prints.
    pub fn py(&self, script: &str, args: &[&str]) -> serde_json::Value {
        let out = Command::new(&self.python)
            .arg(self.py_dir.join(script))
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
        assert!(
            out.status.success(),
            "{script} {args:?} failed: {}",
            out.status
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{script} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn create_topic(&self, topic: &str, partitions: u32) {
        self.create_topic_with(topic, partitions, &[]);
    }

    /// A topic with topic configs (`("max.message.bytes", "262144")`).
    pub fn create_topic_with(&self, topic: &str, partitions: u32, configs: &[(&str, &str)]) {
        let partitions = partitions.to_string();
        let configs: Vec<String> = configs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec![
            "--brokers",
            &self.kafka,
            "--topic",
            topic,
            "--partitions",
            &partitions,
        ];
        for c in &configs {
            args.extend(["--config", c.as_str()]);
        }
        self.py("kafka_create_topic.py", &args);
    }

    pub fn create_bucket(&self, bucket: &str) {
        self.py(
            "s3_make_bucket.py",
            &["--endpoint", &self.s3_endpoint, "--bucket", bucket],
        );
    }

    pub fn kafka_summary(&self, topic: &str, expect: u64) -> serde_json::Value {
        self.py(
            "kafka_summary.py",
            &[
                "--brokers",
                &self.kafka,
                "--topic",
                topic,
                "--expect",
                &expect.to_string(),
                "--timeout",
                // ~30,000 messages/s read and checked here, with room for a loaded machine.
                &(120 + expect / 10_000).to_string(),
            ],
        )
    }

    /// Every object of `bucket` with its ETag (`s3_etags.py`, boto3).
    pub fn s3_etags(&self, bucket: &str) -> std::collections::BTreeMap<String, String> {
        let v = self.py(
            "s3_etags.py",
            &["--endpoint", &self.s3_endpoint, "--bucket", bucket],
        );
        serde_json::from_value(v).expect("s3_etags.py prints a map of strings")
    }

    /// Sends `count` numbered events (`"<tag> <number>"`, from `first`) to a relay's
    /// Forward `port` with tests/py/fluent_send.py, acknowledged in batches of 250,
    /// stamped `time` (RFC 3339) or spread over the `spread` seconds after it.
    #[allow(clippy::too_many_arguments)]
    pub fn fluent_send(
        &self,
        port: u16,
        tag: &str,
        first: u64,
        count: u64,
        time: &str,
        spread: f64,
    ) {
        let sent = self.py(
            "fluent_send.py",
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--tag",
                tag,
                "--count",
                &count.to_string(),
                "--first",
                &first.to_string(),
                "--time",
                time,
                "--spread",
                &spread.to_string(),
                "--prefix",
                &format!("{tag} "),
                "--ack",
                "--batch",
                "250",
            ],
        );
        assert_eq!(sent["sent"], count, "{sent}");
    }

    /// Hour partitions as boto3 finds them: objects and their lines, manifests, markers
    /// (tests/py/s3_hours.py).
    pub fn s3_hours(&self, bucket: &str) -> serde_json::Value {
        self.py(
            "s3_hours.py",
            &["--endpoint", &self.s3_endpoint, "--bucket", bucket],
        )
    }

    pub fn s3_summary(&self, bucket: &str) -> serde_json::Value {
        self.py(
            "s3_summary.py",
            &["--endpoint", &self.s3_endpoint, "--bucket", bucket],
        )
    }
}

/// A test knob from the environment (`SLUICE_OUTAGE_SECS=120` and the like), else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SS.fffffffffZ`.
pub fn rfc3339(secs: f64) -> String {
    sluice_relay::sinks::object::hours::rfc3339_secs(secs)
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.f]Z` (panics on anything else).
pub fn parse_rfc3339(t: &str) -> f64 {
    let num = |r: std::ops::Range<usize>| -> i64 {
        t.get(r)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not RFC 3339: {t:?}"))
    };
    let days =
        sluice_relay::envelope::days_from_civil(num(0..4), num(5..7) as u32, num(8..10) as u32);
    let whole = days * 86_400 + num(11..13) * 3600 + num(14..16) * 60 + num(17..19);
    let frac: f64 = t
        .get(19..t.len() - 1)
        .filter(|f| f.starts_with('.'))
        .map(|f| format!("0{f}").parse().unwrap_or(0.0))
        .unwrap_or(0.0);
    whole as f64 + frac
}

/// A unique, valid name for topics and buckets of one test.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; panics with `what`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Certificates generated at test time: a CA and a server certificate for
/// `localhost` / 127.0.0.1 signed by it, as PEM files in `dir`.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path, name: &str) -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("sluice test CA {name}"));
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params");
        let cert = params.signed_by(&key, &issuer).expect("server cert");
        let certs = Certs {
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}-server.pem")),
            key: dir.join(format!("{name}-server.key")),
        };
        std::fs::write(&certs.ca, ca_cert.pem()).expect("write CA");
        std::fs::write(&certs.cert, cert.pem()).expect("write cert");
        std::fs::write(&certs.key, key.serialize_pem()).expect("write key");
        certs
    }
}

/// Runs `binary --config <config> --check-config` (with `env` added): whether it
/// succeeded, and what it printed (stdout, then stderr).
pub fn run_check_config(binary: &str, config: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(bin(binary))
        .arg("--config")
        .arg(config)
        .arg("--check-config")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every file under `dir` (recursively) for which `keep` is true, sorted.
pub fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if keep(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Where cargo put the binaries (target/debug next to this test executable's deps/).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} does not exist: build the binaries first (cargo build --workspace --bins; scripts/test does)",
        path.display()
    );
    path
}

/// Children get SIGKILL when the test thread that started them ends, even when the test
/// process itself is killed (Drop does not run then): no orphans holding ports.
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child being set up.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// A running sluice binary; killed on drop if still running. The child sits behind a
/// mutex so that "is it still running?" can be asked through a shared reference, from
/// inside a [`wait_for`] condition that also reads the process's metrics.
pub struct Proc {
    pub name: String,
    child: std::sync::Mutex<Option<Child>>,
    pub log: PathBuf,
}

impl Proc {
    pub fn start(binary: &str, config: &Path, log: &Path) -> Proc {
        Proc::start_with_env(binary, config, log, &[])
    }

    pub fn start_with_env(
        binary: &str,
        config: &Path,
        log: &Path,
        env: &[(String, String)],
    ) -> Proc {
        Proc::start_exe(&bin(binary), config, log, env)
    }

    /// As [`start_with_env`](Proc::start_with_env), for the executable at `exe` instead
    /// of one cargo built (the binary a package installed).
    pub fn start_exe(exe: &Path, config: &Path, log: &Path, env: &[(String, String)]) -> Proc {
        let binary = exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| exe.display().to_string());
        let log_file = std::fs::File::create(log).expect("log file");
        let child = die_with_test(&mut Command::new(exe))
            .arg("--config")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("SLUICE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        Proc {
            name: binary,
            child: std::sync::Mutex::new(Some(child)),
            log: log.to_owned(),
        }
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child().as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// SIGTERM, then waits up to `timeout` for the exit, and returns its status.
    /// Panics (with the log) when the process does not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let Some(mut child) = self.child().take() else {
            panic!("{} is not running", self.name);
        };
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not stop within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for a clean exit (status 0; anything else panics with the log).
    /// Does nothing when the process is not running.
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.child().is_none() {
            return None;
        }
        let status = self.terminate(timeout);
        assert!(
            status.success(),
            "{} exited with {status}; log:\n{}",
            self.name,
            self.log_text()
        );
        Some(status)
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        match self.child().as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Panics with the log when the process has exited.
    pub fn assert_running(&self) {
        assert!(
            self.is_running(),
            "{} exited; log:\n{}",
            self.name,
            self.log_text()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: SocketAddr, proc_: &Proc) {
    wait_for(
        &format!("{} to listen on {addr}", proc_.name),
        Duration::from_secs(30),
        || {
            proc_.assert_running();
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        },
    );
}

/// GET `path` from a metrics endpoint (plain HTTP/1.0, no client library needed).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// Sum of a metric's samples whose label set contains `labels` (e.g. `sink="kafka"`).
pub fn metric(addr: SocketAddr, name: &str, labels: &str) -> Option<f64> {
    let text = http_get(addr, "/metrics")?;
    let mut sum = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels_part, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        if !labels.is_empty() && !labels_part.contains(labels) {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// Appends `count` numbered lines (`line 00000001 <padding>`) starting at `first`.
pub fn write_numbered_lines(path: &Path, first: u64, count: u64) {
    let mut f = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open log"),
    );
    for n in first..first + count {
        writeln!(
            f,
            "line {n:08} GET /api/v1/items/{} 200 {}ms agent=test",
            n % 9973,
            n % 250
        )
        .expect("write line");
    }
    f.flush().expect("flush");
}

impl Services {
    /// The same services, with Kafka and/or S3 replaced (for example by a [`PrivateService`]).
    pub fn with(&self, kafka: Option<&str>, s3_endpoint: Option<&str>) -> Services {
        Services {
            kafka: kafka.unwrap_or(&self.kafka).to_string(),
            s3_endpoint: s3_endpoint.unwrap_or(&self.s3_endpoint).to_string(),
            python: self.python.clone(),
            py_dir: self.py_dir.clone(),
        }
    }
}

/// A tansu or moto of one test's own, for tests that take a service away (SIGSTOP) and
/// bring it back (SIGCONT) without disturbing the shared ones. Both keep their data in
/// memory, so a paused service is the honest model of "the broker is down" here: killing
/// it would also erase what it already holds and nothing could be checked afterwards.
pub struct PrivateService {
    pub addr: String,
    child: Child,
    /// Starts the service again on the same address (a service whose data survives it).
    respawn: Option<Box<dyn Fn() -> Child>>,
}

impl PrivateService {
    pub fn tansu(svc: &Services, log: &Path) -> PrivateService {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let url = format!("tcp://{addr}");
        let child = die_with_test(&mut Command::new("tansu"))
            .args([
                "broker",
                "--storage-engine",
                "memory://tansu/",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .env("RUST_LOG", "warn")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("tansu log"))
            .spawn()
            .expect("cannot start tansu (scripts/test installs it into ~/.cargo/bin)");
        let service = PrivateService {
            addr,
            child,
            respawn: None,
        };
        svc.py("wait_ready.py", &["--kafka", &service.addr]);
        service
    }

    /// A tansu that keeps its data in `bucket` on the test S3 server (tansu's dynostore
    /// engine, `s3://`), so it can be killed and started again with its topics intact:
    /// a real broker restart. The bucket must exist.
    pub fn tansu_on_s3(svc: &Services, bucket: &str, log: &Path) -> PrivateService {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let url = format!("tcp://{addr}");
        let (endpoint, storage, log) = (
            svc.s3_endpoint.clone(),
            format!("s3://{bucket}/"),
            log.to_path_buf(),
        );
        let spawn = move || {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("tansu log");
            die_with_test(&mut Command::new("tansu"))
                .args([
                    "broker",
                    "--storage-engine",
                    &storage,
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                ])
                .env("RUST_LOG", "warn")
                .env("AWS_ENDPOINT", &endpoint)
                .env("AWS_ALLOW_HTTP", "true")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("cannot start tansu (scripts/test installs it into ~/.cargo/bin)")
        };
        let service = PrivateService {
            addr,
            child: spawn(),
            respawn: Some(Box::new(spawn)),
        };
        svc.py("wait_ready.py", &["--kafka", &service.addr]);
        service
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s), starts it again on the same address
    /// once `down` has passed, and waits until it answers. Only for a service whose data
    /// survives ([`Self::tansu_on_s3`]). (Not kill -9: tansu's S3 storage, killed in the
    /// middle of a write, was seen to keep a partition it then never served to its end,
    /// which no reader, ours or confluent-kafka, can get past.)
    pub fn restart(&mut self, svc: &Services, down: Duration) {
        let respawn = self
            .respawn
            .as_ref()
            .expect("only a service whose data survives it can be restarted");
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down); // the outage itself, not a synchronisation
        self.child = respawn();
        svc.py("wait_ready.py", &["--kafka", &self.addr]);
    }

    pub fn moto(svc: &Services, log: &Path) -> PrivateService {
        let port = free_port();
        let server = svc.python.parent().expect("venv bin").join("moto_server");
        let child = die_with_test(&mut Command::new(server))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("moto log"))
            .spawn()
            .expect("cannot start moto_server from the test venv");
        let service = PrivateService {
            addr: format!("http://127.0.0.1:{port}"),
            child,
            respawn: None,
        };
        svc.py("wait_ready.py", &["--s3", &service.addr]);
        service
    }

    /// SIGSTOP: the port stays open but nothing answers, like a hung or partitioned server.
    pub fn pause(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGSTOP);
        }
    }

    pub fn resume(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGCONT);
        }
    }
}

impl Drop for PrivateService {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set size of a process in KiB (`VmRSS`), 0 when it is gone.
pub fn rss_kib(pid: i32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// Peak resident set size of a process in KiB (`VmHWM`), 0 when it is gone.
pub fn peak_rss_kib(pid: i32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

fn proc_status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix(field)
                        .map(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
}

/// A test CA that issues more than [`Certs::generate`] does: client certificates for
/// mutual TLS, certificates for other names, expired ones.
pub struct TestCa {
    pub ca: PathBuf,
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key, as PEM files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("sluice test CA {name}"));
        let cert = params.self_signed(&key).expect("CA cert");
        let ca = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca, cert.pem()).expect("write CA");
        TestCa {
            ca,
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Issues `<name>.pem` / `<name>.key` for `names` (usable as server and client
    /// certificate); `expired` makes one whose validity ended in 2021.
    pub fn issue(&self, name: &str, names: &[&str], expired: bool) -> Issued {
        use rcgen::{date_time_ymd, CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("cert");
        let issued = Issued {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write cert");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write key");
        issued
    }
}

/// A log file's text without ANSI colour codes, so `peer=...` fields can be matched.
pub fn plain_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Certs {
    /// The relay's side: this server certificate and key.
    pub fn server_tls(&self) -> ServerTlsFiles {
        server_tls(&self.cert, &self.key)
    }

    /// The agent's side: trust this CA, and check the relay's certificate for `localhost`.
    pub fn client_tls(&self) -> ClientTlsFiles {
        client_tls(&self.ca)
    }
}

impl Issued {
    /// This certificate and key as a relay's server certificate.
    pub fn server_tls(&self) -> ServerTlsFiles {
        server_tls(&self.cert, &self.key)
    }
}

impl TestCa {
    /// The agent's side: trust this CA, and check the relay's certificate for `localhost`.
    pub fn client_tls(&self) -> ClientTlsFiles {
        client_tls(&self.ca)
    }
}

fn server_tls(cert: &Path, key: &Path) -> ServerTlsFiles {
    ServerTlsFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
        client_ca: None,
        client_auth: ClientAuth::None,
    }
}

fn client_tls(ca: &Path) -> ClientTlsFiles {
    ClientTlsFiles {
        ca: Some(ca.to_owned()),
        server_name: Some("localhost".into()),
        ..ClientTlsFiles::default()
    }
}

/// A free loopback address (see [`free_port`]).
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A config struct whose required keys are `required` and all others the crate's own
/// serde defaults, so a test starts from exactly what an operator's minimal config gets.
pub(crate) fn with_defaults<T: serde::de::DeserializeOwned>(required: serde_json::Value) -> T {
    serde_json::from_value(required.clone())
        .unwrap_or_else(|e| panic!("config defaults from {required}: {e}"))
}

pub use sluice_core::tls::{ClientAuth, ClientTlsFiles, ServerTlsFiles};
pub use sluice_core::units::{ByteSize, Span};
