//! The packages `scripts/package` builds, checked with the real tools: the four files;
//! what dpkg-deb and rpm say is in them (paths, conffiles, dependencies, scriptlets);
//! both .debs installed into a throwaway root by dpkg with their maintainer scripts
//! (`dpkg --root --force-script-chrootless`: the user, the data dirs, nothing on this
//! system); the packaged binaries passing `--check-config` on the packaged configs and
//! running as a pair (agent -> relay on loopback); a changed conffile kept over a
//! reinstall; remove keeping the data, purge removing it and, last, the user; the units
//! checked by `systemd-analyze verify`.
//!
//! Needs dpkg, rpm (rpmbuild) and binutils, which scripts/lib/deps.sh installs; it packages
//! the debug binaries cargo built (`--bin-dir`), never a release build.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sluice_e2e::{
    bin, file_sink, http_get, loopback, wait_for, wait_listening, AgentConfig, InputConfig, Proc,
    RelayConfig,
};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const PACKAGES: [(&str, &str); 2] = [
    ("sluice-agent", "agent.toml"),
    ("sluice-relay", "relay.toml"),
];

fn repo() -> PathBuf {
    sluice_core::configdoc::manifest_dir(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn output(cmd: &mut Command) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!("cannot run {program}: {e} (scripts/lib/deps.sh installs dpkg, rpm and binutils)")
    })
}

/// Runs `cmd`, panics with everything it printed unless it exits 0; returns its stdout.
fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The highest GLIBC_x.y symbol version `objdump -T` shows for `binary`.
fn glibc_needed(binary: &Path) -> String {
    let symbols = run(Command::new("objdump").arg("-T").arg(binary));
    let key = |v: &&str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap_or(0)).collect() };
    symbols
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        .max_by_key(key)
        .unwrap_or_else(|| panic!("{} references no GLIBC_ version", binary.display()))
        .to_string()
}

/// A directory dpkg treats as a system root: an empty package database, the host's
/// versions of the packages the .debs depend on recorded as installed (so their Depends
/// are checked, not forced), and passwd/group/shadow files with root and adm only.
struct DpkgRoot {
    dir: PathBuf,
}

impl DpkgRoot {
    fn new(dir: PathBuf, debs: &[PathBuf]) -> DpkgRoot {
        let admin = dir.join("var/lib/dpkg");
        for sub in ["info", "updates"] {
            std::fs::create_dir_all(admin.join(sub)).unwrap();
        }
        let mut depends: Vec<String> = Vec::new();
        for deb in debs {
            let field = run(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Depends"));
            for dep in field.trim().split(',') {
                let name = dep.split_whitespace().next().expect("a dependency name");
                if !depends.iter().any(|d| d == name) {
                    depends.push(name.to_string());
                }
            }
        }
        let mut status = String::new();
        for name in &depends {
            let fields = run(Command::new("dpkg-query").args([
                "-W",
                "-f",
                "${Version}\n${Architecture}\n${Multi-Arch}",
                name,
            ]));
            let mut f = fields.split('\n');
            let (version, arch, multi) = (f.next().unwrap(), f.next().unwrap(), f.next());
            status.push_str(&format!(
                "Package: {name}\nStatus: install ok installed\nPriority: optional\nVersion: {version}\nArchitecture: {arch}\n"
            ));
            if let Some(m) = multi.filter(|m| !m.is_empty()) {
                status.push_str(&format!("Multi-Arch: {m}\n"));
            }
            status.push_str(
                "Maintainer: nobody\nDescription: the host's version, recorded for the test\n\n",
            );
        }
        std::fs::write(admin.join("status"), status).unwrap();
        let etc = dir.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(etc.join("group"), "root:x:0:\nadm:x:4:\n").unwrap();
        std::fs::write(etc.join("shadow"), "root:*:20000:0:99999:7:::\n").unwrap();
        std::fs::write(etc.join("gshadow"), "root:*::\nadm:*::\n").unwrap();
        DpkgRoot { dir }
    }

    /// dpkg on this root, maintainer scripts run from here with DPKG_ROOT set.
    fn dpkg(&self, args: &[&std::ffi::OsStr]) -> String {
        run(Command::new("dpkg")
            .arg(format!("--root={}", self.dir.display()))
            .arg("--force-script-chrootless")
            .args(args))
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p.trim_start_matches('/'))
    }

    /// `ii ` (installed), `rc ` (config files left) or `un ` (gone) for `pkg`.
    fn status(&self, pkg: &str) -> String {
        let out = output(
            Command::new("dpkg-query")
                .arg(format!(
                    "--admindir={}",
                    self.path("var/lib/dpkg").display()
                ))
                .args(["-W", "-f", "${db:Status-Abbrev}", pkg]),
        );
        match String::from_utf8_lossy(&out.stdout).into_owned() {
            s if s.is_empty() => "un ".into(),
            s => s,
        }
    }

    /// The numeric id of `name` in the root's `passwd` or `group` file.
    fn id(&self, file: &str, name: &str) -> Option<u32> {
        read(&self.path(&format!("etc/{file}")))
            .lines()
            .find(|l| l.split(':').next() == Some(name))
            .and_then(|l| l.split(':').nth(2))
            .and_then(|id| id.parse().ok())
    }
}

#[test]
fn packages_build_install_upgrade_and_purge() {
    let started = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("packages");
    let bin_dir = bin("sluice-relay").parent().unwrap().to_owned();
    bin("sluice-agent");

    // 1. One command makes all four files; it states the glibc it measured.
    let printed = run(Command::new(repo().join("scripts/package"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(&out_dir)
        .args(["--compress", "gzip"]));
    println!("{printed}");
    let deb = |pkg: &str| out_dir.join(format!("{pkg}_{VERSION}_amd64.deb"));
    let rpm = |pkg: &str| out_dir.join(format!("{pkg}-{VERSION}-1.x86_64.rpm"));
    for (pkg, _) in PACKAGES {
        for file in [deb(pkg), rpm(pkg)] {
            assert!(file.is_file(), "scripts/package made no {}", file.display());
        }
    }

    // 2. What dpkg-deb sees: conffile, paths, and a libc6 dependency matching the binary.
    for (pkg, config) in PACKAGES {
        let glibc = glibc_needed(&bin_dir.join(pkg));
        assert!(
            printed.contains(&format!("{pkg}: needs glibc >= {glibc}")),
            "scripts/package does not state {pkg}'s glibc {glibc}:\n{printed}"
        );
        let conffiles = run(Command::new("dpkg-deb")
            .arg("-I")
            .arg(deb(pkg))
            .arg("conffiles"));
        assert_eq!(conffiles.trim(), format!("/etc/sluice/{config}"), "{pkg}");
        let info = run(Command::new("dpkg-deb").arg("-I").arg(deb(pkg)));
        assert!(info.contains(" conffiles"), "{info}");
        for script in ["postinst", "prerm", "postrm"] {
            assert!(info.contains(script), "{pkg}.deb has no {script}:\n{info}");
        }
        let depends = run(Command::new("dpkg-deb")
            .arg("-f")
            .arg(deb(pkg))
            .arg("Depends"));
        assert!(
            depends.contains(&format!("libc6 (>= {glibc})")),
            "{pkg}: Depends {depends:?} does not say libc6 (>= {glibc})"
        );
        let files = run(Command::new("dpkg-deb").arg("-c").arg(deb(pkg)));
        for path in [
            format!("./usr/bin/{pkg}"),
            format!("./lib/systemd/system/{pkg}.service"),
            format!("./etc/sluice/{config}"),
        ] {
            assert!(
                files.lines().any(|l| l.ends_with(&path)),
                "{pkg}.deb lacks {path}:\n{files}"
            );
        }
    }

    // 3. What rpm sees: files, %config(noreplace), glibc, the scriptlets (valid sh).
    for (pkg, config) in PACKAGES {
        let glibc = glibc_needed(&bin_dir.join(pkg));
        let rpm = rpm(pkg);
        let files = run(Command::new("rpm").arg("-qlp").arg(&rpm));
        for path in [
            format!("/usr/bin/{pkg}"),
            format!("/usr/lib/systemd/system/{pkg}.service"),
            format!("/etc/sluice/{config}"),
            format!("/var/lib/{pkg}"),
        ] {
            assert!(
                files.lines().any(|l| l == path),
                "{pkg}.rpm lacks {path}:\n{files}"
            );
        }
        let flags = run(Command::new("rpm")
            .arg("-qp")
            .arg(&rpm)
            .args(["--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]"]));
        assert!(
            flags
                .lines()
                .any(|l| l == format!("cn /etc/sluice/{config}")),
            "{pkg}.rpm: /etc/sluice/{config} is not %config(noreplace):\n{flags}"
        );
        let requires = run(Command::new("rpm").arg("-qp").arg("--requires").arg(&rpm));
        assert!(
            requires.lines().any(|l| l == format!("glibc >= {glibc}")),
            "{pkg}.rpm: no 'glibc >= {glibc}' in\n{requires}"
        );
        let scripts = run(Command::new("rpm").arg("-qp").arg("--scripts").arg(&rpm));
        for section in ["preinstall", "postinstall", "preuninstall", "postuninstall"] {
            assert!(
                scripts.contains(&format!("{section} scriptlet")),
                "{pkg}.rpm has no {section} scriptlet:\n{scripts}"
            );
        }
        for needle in ["useradd", "try-restart", "[ -d /run/systemd/system ]"] {
            assert!(
                scripts.contains(needle),
                "{pkg}.rpm scriptlets lack {needle}:\n{scripts}"
            );
        }
        for tag in ["PREIN", "POSTIN", "PREUN", "POSTUN"] {
            let text = run(Command::new("rpm")
                .arg("-qp")
                .arg(&rpm)
                .args(["--qf", &format!("%{{{tag}}}")]));
            let file = tmp.path().join(format!("{pkg}-{tag}.sh"));
            std::fs::write(&file, text).unwrap();
            run(Command::new("sh").arg("-n").arg(&file));
        }
    }

    // 4. Both .debs into a throwaway root: the scripts make the user and the data dirs
    //    there, and touch nothing of this system.
    let host_passwd = (
        read(Path::new("/etc/passwd")),
        read(Path::new("/etc/group")),
    );
    let root = DpkgRoot::new(
        tmp.path().join("root"),
        &[deb("sluice-agent"), deb("sluice-relay")],
    );
    root.dpkg(&[
        "-i".as_ref(),
        deb("sluice-agent").as_os_str(),
        deb("sluice-relay").as_os_str(),
    ]);
    for (pkg, _) in PACKAGES {
        assert_eq!(
            root.status(pkg),
            "ii ",
            "{pkg} is not installed in the root"
        );
    }
    let uid = root
        .id("passwd", "sluice")
        .expect("postinst did not add user sluice to the root's etc/passwd");
    let gid = root
        .id("group", "sluice")
        .expect("postinst did not add group sluice to the root's etc/group");
    assert!(
        read(&root.path("etc/passwd")).contains(&format!("sluice:x:{uid}:{gid}:")),
        "sluice's primary group is not sluice"
    );
    assert_eq!(
        host_passwd,
        (
            read(Path::new("/etc/passwd")),
            read(Path::new("/etc/group"))
        ),
        "the maintainer scripts changed this system's passwd or group"
    );
    {
        use std::os::unix::fs::MetadataExt;
        for (pkg, config) in PACKAGES {
            let data = std::fs::metadata(root.path(&format!("var/lib/{pkg}"))).unwrap();
            assert!(
                data.is_dir() && data.uid() == uid && data.gid() == gid,
                "/var/lib/{pkg} is not sluice's"
            );
            let conf = std::fs::metadata(root.path(&format!("etc/sluice/{config}"))).unwrap();
            assert_eq!(
                (conf.mode() & 0o777, conf.uid(), conf.gid()),
                (0o640, 0, gid),
                "/etc/sluice/{config} is not root:sluice 0640"
            );
        }
    }

    // 5. The packaged binaries accept the packaged configs.
    for (pkg, config) in PACKAGES {
        let checked = run(Command::new(root.path(&format!("usr/bin/{pkg}")))
            .arg("--config")
            .arg(root.path(&format!("etc/sluice/{config}")))
            .arg("--check-config"));
        assert!(checked.contains(": ok"), "{pkg} --check-config:\n{checked}");
    }

    verify_units(&root, tmp.path());

    // 6. The packaged pair runs: the relay with its packaged config, the agent with its
    //    own, each moved to this test's ports and directories, a line from one to the other.
    let work = tmp.path().join("run");
    std::fs::create_dir_all(work.join("app")).unwrap();
    let mut relay_config = RelayConfig::load(&root.path("etc/sluice/relay.toml")).unwrap();
    relay_config.relay.data_dir = work.join("relay-data");
    relay_config.server.listen = loopback();
    let relay_metrics = loopback();
    relay_config.metrics.listen = Some(relay_metrics);
    let events = work.join("events.ndjson");
    assert_eq!(
        relay_config.sinks.len(),
        1,
        "the packaged relay has one sink"
    );
    assert_eq!(relay_config.sinks[0].kind.type_name(), "file");
    relay_config.sinks[0] = file_sink(&relay_config.sinks[0].name, &events);
    let relay_path = work.join("relay.toml");
    std::fs::write(&relay_path, toml::to_string(&relay_config).unwrap()).unwrap();

    let mut agent_config = AgentConfig::load(&root.path("etc/sluice/agent.toml")).unwrap();
    agent_config.agent.data_dir = work.join("agent-data");
    match agent_config.inputs.first_mut() {
        Some(InputConfig::Tail(tail)) => {
            tail.include = vec![work.join("app/*.log").display().to_string()];
            tail.start_at = sluice_tail::StartAt::Beginning;
        }
        None => panic!("the packaged agent config has no input"),
    }
    // Through serde, as the harness does: the list's Rust shape is the agent's business.
    agent_config.output.relays =
        serde_json::from_value(serde_json::json!([relay_config.server.listen.to_string()]))
            .expect("relays from a list of addresses");
    agent_config.metrics.listen = Some(loopback());
    let agent_path = work.join("agent.toml");
    std::fs::write(&agent_path, toml::to_string(&agent_config).unwrap()).unwrap();
    let line = "a line through the packaged agent and relay";
    std::fs::write(work.join("app/app.log"), format!("{line}\n")).unwrap();

    let mut relay = Proc::start_exe(
        &root.path("usr/bin/sluice-relay"),
        &relay_path,
        &work.join("relay.log"),
        &[],
    );
    wait_listening(relay_config.server.listen, &relay);
    let health = http_get(relay_metrics, "/health").unwrap_or_default();
    assert!(health.contains(" 200 "), "relay /health: {health}");
    let mut agent = Proc::start_exe(
        &root.path("usr/bin/sluice-agent"),
        &agent_path,
        &work.join("agent.log"),
        &[],
    );
    wait_for(
        "the line in the relay's file sink",
        Duration::from_secs(60),
        || {
            agent.assert_running();
            relay.assert_running();
            std::fs::read_to_string(&events).is_ok_and(|t| t.contains(line))
        },
    );
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(60));

    // 7. A changed conffile survives installing the package again (an upgrade onto the
    //    same version, postinst configure with the old version).
    let conf = root.path("etc/sluice/agent.toml");
    let changed = format!("{}\n# changed by the packaging test\n", read(&conf));
    std::fs::write(&conf, &changed).unwrap();
    root.dpkg(&["-i".as_ref(), deb("sluice-agent").as_os_str()]);
    assert_eq!(
        read(&conf),
        changed,
        "reinstalling replaced the changed conffile"
    );
    for leftover in ["dpkg-dist", "dpkg-new", "dpkg-old"] {
        assert!(
            !root
                .path(&format!("etc/sluice/agent.toml.{leftover}"))
                .exists(),
            "reinstalling left agent.toml.{leftover}"
        );
    }
    assert_eq!(
        read(&root.path("etc/passwd")).matches("\nsluice:").count(),
        1,
        "the user was added twice"
    );

    // 8. remove keeps config and data; purge removes them, and the user goes with the
    //    last sluice package dpkg knows.
    let spool_file = root.path("var/lib/sluice-relay/spool-segment");
    std::fs::write(&spool_file, "data").unwrap();
    root.dpkg(&["--remove".as_ref(), "sluice-relay".as_ref()]);
    assert_eq!(root.status("sluice-relay"), "rc ");
    assert!(
        !root.path("usr/bin/sluice-relay").exists(),
        "remove left the binary"
    );
    assert!(
        !root
            .path("lib/systemd/system/sluice-relay.service")
            .exists(),
        "remove left the unit"
    );
    assert!(
        root.path("etc/sluice/relay.toml").exists(),
        "remove deleted the conffile"
    );
    assert!(spool_file.exists(), "remove deleted the relay's data");

    root.dpkg(&["--purge".as_ref(), "sluice-agent".as_ref()]);
    assert_eq!(root.status("sluice-agent"), "un ");
    for gone in [
        "usr/bin/sluice-agent",
        "lib/systemd/system/sluice-agent.service",
        "etc/sluice/agent.toml",
        "var/lib/sluice-agent",
    ] {
        assert!(
            !root.path(gone).exists(),
            "purging sluice-agent left /{gone}"
        );
    }
    assert!(
        root.id("passwd", "sluice").is_some(),
        "purging sluice-agent removed user sluice while sluice-relay's files remain"
    );

    root.dpkg(&["--purge".as_ref(), "sluice-relay".as_ref()]);
    assert_eq!(root.status("sluice-relay"), "un ");
    for gone in ["etc/sluice", "var/lib/sluice-relay"] {
        assert!(
            !root.path(gone).exists(),
            "purging sluice-relay left /{gone}"
        );
    }
    assert_eq!(root.id("passwd", "sluice"), None, "purge left user sluice");
    assert_eq!(root.id("group", "sluice"), None, "purge left group sluice");
    println!("packaging test: {:.1} s", started.elapsed().as_secs_f64());
}

/// `systemd-analyze verify` on both installed units, in a root of their own: the
/// installed binaries and units, and this host's unit files for the targets they name.
/// Warnings (unknown keys, bad values) fail the test as errors do.
fn verify_units(root: &DpkgRoot, tmp: &Path) {
    let host_units = Path::new("/usr/lib/systemd/system");
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("systemd-analyze verify skipped: systemd-analyze is not installed");
        return;
    }
    if !host_units.join("sysinit.target").exists() {
        println!(
            "systemd-analyze verify skipped: no {}/sysinit.target to verify against",
            host_units.display()
        );
        return;
    }
    let vroot = tmp.join("verify-root");
    std::fs::create_dir_all(vroot.join("usr/lib/systemd")).unwrap();
    std::fs::create_dir_all(vroot.join("usr/bin")).unwrap();
    std::fs::create_dir_all(vroot.join("lib/systemd/system")).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(host_units)
        .arg(vroot.join("usr/lib/systemd/")));
    let mut units = Vec::new();
    for (pkg, _) in PACKAGES {
        std::fs::hard_link(
            root.path(&format!("usr/bin/{pkg}")),
            vroot.join(format!("usr/bin/{pkg}")),
        )
        .unwrap();
        let unit = format!("lib/systemd/system/{pkg}.service");
        std::fs::copy(root.path(&unit), vroot.join(&unit)).unwrap();
        units.push(format!("/{unit}"));
    }
    let out = output(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", vroot.display()))
            .args(&units),
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {units:?} ({}):\n{said}",
        out.status
    );
    println!("systemd-analyze verify: both units clean");
}
