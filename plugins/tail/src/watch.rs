//! Early opening of new files, driven by inotify (Linux), so that a file rotated away and
//! deleted before the next scan is still read.
//!
//! Why: a writer that rotates fast with `rotate 2` (rename app.log.1 → app.log.2, which
//! deletes the old .2) can create, fill and delete a file within milliseconds. A file is
//! only readable after its last name is gone if someone holds it open, so polling every
//! 250 ms — or a reading thread that is blocked because the relay is behind — loses it.
//! A small thread therefore waits for `IN_CREATE` / `IN_MOVED_TO` in the directories the
//! include globs can match and opens every matching file at once. The [`Tailer`] adopts
//! these handles at its next scan; until then they only pin the inode.
//!
//! The scan stays the source of truth (it also runs where inotify is unavailable or its
//! queue overflowed): the watcher only makes files *visible earlier*.
//!
//! [`Tailer`]: crate::Tailer

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The watcher thread's nice value, where allowed (see [`raise_priority`]).
const WATCH_NICE: libc::c_int = -10;

/// Handles waiting to be adopted, at most; beyond, new files wait for the scan (and a
/// warning says so).
const MAX_PENDING: usize = 4096;

/// A file opened by the watcher thread.
#[derive(Debug)]
pub(crate) struct Opened {
    pub path: PathBuf,
    pub handle: File,
    pub dev: u64,
    pub ino: u64,
    /// Value of the shared clock right after the open: see [`Watcher::clock`].
    pub opened_at: u64,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    /// Orders opens against the tailer's `forget`s: a handle opened before a file was
    /// forgotten is the forgotten file (its inode cannot be reused while it is open)
    /// and must not be adopted as a new one.
    clock: AtomicU64,
    pending: Mutex<Vec<Opened>>,
    /// Watch descriptor → directory.
    dirs: Mutex<HashMap<i32, PathBuf>>,
}

/// The inotify watcher of one tail input. Dropping it stops its thread.
#[derive(Debug)]
pub(crate) struct Watcher {
    shared: Arc<Shared>,
    fd: Arc<Fd>,
}

#[derive(Debug)]
struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor; it is closed once, when the last user is gone.
        unsafe {
            libc::close(self.0);
        }
    }
}

impl Watcher {
    /// Starts the watcher thread; `None` (and a log line) where inotify is unavailable.
    pub fn start(
        input: &str,
        include: &[glob::Pattern],
        exclude: &[glob::Pattern],
    ) -> Option<Watcher> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            tracing::warn!(input, error = %std::io::Error::last_os_error(),
                "inotify unavailable; new files are found by the periodic scan only");
            return None;
        }
        let fd = Arc::new(Fd(fd));
        let shared = Arc::new(Shared::default());
        let thread = {
            let (fd, shared) = (fd.clone(), shared.clone());
            let (include, exclude) = (include.to_vec(), exclude.to_vec());
            let input = input.to_owned();
            std::thread::Builder::new()
                .name(format!("tail-watch-{input}"))
                .spawn(move || run(&input, &fd, &shared, &include, &exclude))
        };
        if let Err(e) = thread {
            tracing::warn!(input, error = %e, "cannot start the file watcher thread; new files are found by the periodic scan only");
            return None;
        }
        Some(Watcher { shared, fd })
    }

    /// Watches `dir` for new files. Idempotent (the kernel returns the same watch), so
    /// every scan calls it: a directory that does not exist yet, or was removed and
    /// created again, is watched from the next scan on.
    pub fn watch_dir(&self, dir: &Path) {
        let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
            return;
        };
        // SAFETY: valid descriptor and NUL-terminated path; the result is checked.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.fd.0,
                c_path.as_ptr(),
                libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ONLYDIR,
            )
        };
        if wd < 0 {
            tracing::debug!(dir = %dir.display(), error = %std::io::Error::last_os_error(), "cannot watch directory (yet)");
            return;
        }
        lock(&self.shared.dirs).insert(wd, dir.to_path_buf());
    }

    /// The handles opened since the last call.
    pub fn take(&self) -> Vec<Opened> {
        std::mem::take(&mut *lock(&self.shared.pending))
    }

    /// A tick of the clock that orders opens and forgets.
    pub fn clock(&self) -> u64 {
        self.shared.clock.fetch_add(1, Ordering::SeqCst)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The directories whose entries `pattern` can match: its parent, globbed when the
/// parent itself has wildcards.
pub(crate) fn dirs_of(pattern: &str) -> Vec<PathBuf> {
    let Some(parent) = Path::new(pattern).parent() else {
        return Vec::new();
    };
    let text = parent.to_string_lossy();
    if !text.contains(['*', '?', '[']) {
        return vec![parent.to_path_buf()];
    }
    glob::glob(&text)
        .map(|paths| paths.flatten().filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

/// Asks the scheduler to run this thread ahead of the busy ones when it wakes up.
///
/// Why: a file can only be opened while it still has a name, and a writer that rotates
/// fast can create, fill and delete a file within milliseconds. The batching in `run` is
/// what keeps the watcher level with such a writer (see [`Batch`]); the priority only
/// keeps a busy machine from adding a wait for a CPU on top. The thread does almost
/// nothing (an open and an fstat per new name), so its priority costs others nothing
/// measurable. Best effort: lowering the nice value needs
/// CAP_SYS_NICE or an RLIMIT_NICE that allows it (the systemd unit sets `LimitNICE=-10`);
/// without, the thread keeps the default priority and a debug line says so.
fn raise_priority(input: &str) {
    // SAFETY: plain syscalls on the calling thread; results are checked.
    let rc = unsafe {
        // The raw syscall, not glibc's gettid(): that wrapper exists from glibc 2.30 on,
        // and the portable build (scripts/package --portable) links against 2.28.
        let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
        libc::setpriority(libc::PRIO_PROCESS as _, tid as libc::id_t, WATCH_NICE)
    };
    if rc != 0 {
        tracing::debug!(input, nice = WATCH_NICE, error = %std::io::Error::last_os_error(),
            "cannot raise the file watcher's priority; it keeps the default");
    }
}

fn run(
    input: &str,
    fd: &Fd,
    shared: &Shared,
    include: &[glob::Pattern],
    exclude: &[glob::Pattern],
) {
    raise_priority(input);
    // Room for many events; each is a header plus a NUL-padded name.
    let mut buf = vec![0u8; 64 * 1024];
    let mut batch = Batch::default();
    let mut warned_full = false;
    while !shared.stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: fd.0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd. The timeout bounds how long a stop takes.
        let ready = unsafe { libc::poll(&mut pfd, 1, 200) };
        if ready <= 0 {
            continue;
        }
        // Everything queued, then each name once: see `Batch`.
        batch.clear();
        loop {
            // SAFETY: the buffer is valid for its length; the result is checked. The
            // descriptor is non-blocking: -1 (EAGAIN) ends the batch.
            let n = unsafe { libc::read(fd.0, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            batch.parse(&buf[..n as usize], shared);
        }
        for path in batch.paths() {
            if !include.iter().any(|p| p.matches_path(path))
                || exclude.iter().any(|p| p.matches_path(path))
            {
                continue;
            }
            // Opening is all that is urgent; everything else is the tailer's job.
            let Ok(handle) = File::open(path) else {
                continue; // already gone again: nothing anyone could read
            };
            let opened_at = shared.clock.fetch_add(1, Ordering::SeqCst);
            let Ok(meta) = handle.metadata() else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            use std::os::unix::fs::MetadataExt;
            let mut pending = lock(&shared.pending);
            if pending.len() >= MAX_PENDING {
                if !warned_full {
                    tracing::warn!(
                        max = MAX_PENDING,
                        "too many new files waiting to be read; later ones are found by the periodic scan"
                    );
                    warned_full = true;
                }
                continue;
            }
            warned_full = false;
            pending.push(Opened {
                path: path.clone(),
                handle,
                dev: meta.dev(),
                ino: meta.ino(),
                opened_at,
            });
        }
    }
}

/// The names that appeared since the watcher last looked, each once, renamed-in names
/// first.
///
/// Why: an open can block for milliseconds behind the writer's own rename (the
/// filesystem holds the directory lock while it flushes the data of a file renamed over
/// another). A watcher that opens once per event falls behind a fast rotator by one such
/// wait per event, and a file that was created, rotated twice and deleted in the meantime
/// is lost. Opening each name once per batch keeps it level with the writer. Renamed-in
/// names go first because rotation deletes those files next; a newly created live file
/// stays around longest.
#[derive(Debug, Default)]
struct Batch {
    /// Each name once, in order of first appearance, and whether it was renamed in.
    names: Vec<(PathBuf, bool)>,
    /// Name → its place in `names`.
    index: HashMap<PathBuf, usize>,
}

impl Batch {
    fn clear(&mut self) {
        self.names.clear();
        self.index.clear();
    }

    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        let with = |moved: bool| {
            self.names
                .iter()
                .filter(move |(_, m)| *m == moved)
                .map(|(p, _)| p)
        };
        with(true).chain(with(false))
    }

    /// Adds the events in `bytes`, one `read` of the inotify descriptor.
    fn parse(&mut self, bytes: &[u8], shared: &Shared) {
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut at = 0;
        while at + header <= bytes.len() {
            // SAFETY: the kernel wrote a whole event header at `at`; read it unaligned.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(bytes[at..].as_ptr().cast()) };
            let end = (at + header + event.len as usize).min(bytes.len());
            let name_bytes = &bytes[at + header..end];
            at = end;
            if event.mask & libc::IN_Q_OVERFLOW != 0 {
                tracing::warn!("inotify queue overflowed; the periodic scan finds the files");
                continue;
            }
            if event.mask & libc::IN_IGNORED != 0 {
                // The directory is gone; a later scan watches it again if it comes back.
                lock(&shared.dirs).remove(&event.wd);
                continue;
            }
            if event.mask & libc::IN_ISDIR != 0 {
                continue;
            }
            let name_len = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            if name_len == 0 {
                continue;
            }
            let Some(dir) = lock(&shared.dirs).get(&event.wd).cloned() else {
                continue;
            };
            use std::os::unix::ffi::OsStrExt;
            let path = dir.join(std::ffi::OsStr::from_bytes(&name_bytes[..name_len]));
            let moved = event.mask & libc::IN_MOVED_TO != 0;
            match self.index.get(&path) {
                Some(&i) => self.names[i].1 |= moved,
                None => {
                    self.index.insert(path.clone(), self.names.len());
                    self.names.push((path, moved));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One inotify event as the kernel lays it out: header, then the NUL-padded name.
    fn event(wd: i32, mask: u32, name: &str) -> Vec<u8> {
        let len = (name.len() + 1).next_multiple_of(16);
        let header = libc::inotify_event {
            wd,
            mask,
            cookie: 0,
            len: len as u32,
        };
        // SAFETY: inotify_event is plain old data; we copy its bytes.
        let mut out = unsafe {
            std::slice::from_raw_parts(
                (&header as *const libc::inotify_event).cast::<u8>(),
                std::mem::size_of::<libc::inotify_event>(),
            )
        }
        .to_vec();
        out.extend_from_slice(name.as_bytes());
        out.resize(out.len() + len - name.len(), 0);
        out
    }

    #[test]
    fn a_batch_names_each_file_once_renamed_in_names_first() {
        let shared = Shared::default();
        lock(&shared.dirs).insert(1, PathBuf::from("/logs"));
        // Two rotations seen late: create, rename .1 -> .2, rename live -> .1, create...
        let mut bytes = Vec::new();
        for (mask, name) in [
            (libc::IN_CREATE, "app.log"),
            (libc::IN_MOVED_TO, "app.log.2"),
            (libc::IN_MOVED_TO, "app.log.1"),
            (libc::IN_CREATE, "app.log"),
            (libc::IN_MOVED_TO, "app.log.2"),
            (libc::IN_MOVED_TO, "app.log.1"),
            (libc::IN_CREATE | libc::IN_ISDIR, "subdir"),
        ] {
            bytes.extend(event(1, mask, name));
        }
        bytes.extend(event(9, libc::IN_CREATE, "unknown-watch.log"));
        let mut batch = Batch::default();
        // Split over two reads, as a full buffer would be.
        let cut = 3 * event(1, libc::IN_CREATE, "app.log").len();
        batch.parse(&bytes[..cut], &shared);
        batch.parse(&bytes[cut..], &shared);
        let got: Vec<_> = batch.paths().map(|p| p.display().to_string()).collect();
        assert_eq!(got, ["/logs/app.log.2", "/logs/app.log.1", "/logs/app.log"]);
        batch.clear();
        assert_eq!(batch.paths().count(), 0);
    }
}
