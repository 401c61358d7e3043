//! CMD as a process: started so that it dies with `leasehold`, placed where the terminal wants
//! it, and signalled together with everything it started.
//!
//! - **Dies with leasehold.** CMD is started through this same binary
//!   (`leasehold --leasehold-exec-child PID -- CMD...`), which sets `PR_SET_PDEATHSIG` to
//!   `SIGKILL` and then execs CMD: if `leasehold` is killed (`kill -9`, the OOM killer), the
//!   kernel kills CMD at once, so CMD cannot outlive the hold that stops being renewed. (Setting
//!   it between fork and exec would need `unsafe`, which this workspace forbids; the exec costs
//!   about a millisecond.) What CMD itself started and detached is not covered.
//! - **Interactive: stays in the terminal's foreground group**, as under `flock`: reading the
//!   terminal works, Ctrl-C reaches CMD directly, Ctrl-Z stops both. `leasehold` then signals
//!   every process descending from it (it is their subreaper, so orphans stay reachable).
//! - **Otherwise: its own process group**, so a signal reaches everything CMD started (a shell's
//!   children too) and nothing else in the caller's group (a pipeline's other commands).

use std::ffi::OsStr;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;

use nix::sys::prctl;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgrp, getpid, getppid, tcgetpgrp};

use super::EXIT_CMD_NOT_STARTED;

/// `argv[1]` of the exec wrapper. Not a user flag: `main` checks it before parsing.
const EXEC_CHILD: &str = "--leasehold-exec-child";

/// In the exec wrapper (`leasehold --leasehold-exec-child PARENT -- CMD...`): arranges to be
/// killed when `leasehold` dies, then becomes CMD. Returns `None` in any other process, and the
/// exit code if CMD could not be started.
pub(crate) fn exec_child_if_asked() -> Option<u8> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(EXEC_CHILD)) {
        return None;
    }
    let parent = args.next().and_then(|a| a.to_str()?.parse::<i32>().ok());
    let (Some(parent), Some(_dashes), Some(program)) = (parent, args.next(), args.next()) else {
        eprintln!("leasehold: {EXEC_CHILD} is for leasehold's own use");
        return Some(EXIT_CMD_NOT_STARTED);
    };
    if let Err(err) = prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("leasehold: cannot tie CMD to leasehold's life (prctl): {err}");
        return Some(EXIT_CMD_NOT_STARTED);
    }
    // leasehold may have died before the line above took effect: then nobody holds the lock.
    if getppid() != Pid::from_raw(parent) {
        return Some(EXIT_CMD_NOT_STARTED);
    }
    // Like spawn, `exec` resets what the Rust runtime changed (SIGPIPE) before CMD starts.
    let err = std::process::Command::new(&program).args(args).exec();
    eprintln!("leasehold: cannot start {program:?}: {err}");
    Some(EXIT_CMD_NOT_STARTED)
}

/// A running CMD.
pub(crate) struct Cmd {
    child: tokio::process::Child,
    pid: Pid,
    /// In the terminal's foreground group (leasehold's own), not a group of its own.
    pub foreground: bool,
}

impl Cmd {
    /// Starts `command` (program and arguments) with `env` added to the environment.
    pub fn spawn(command: &[String], env: &[(&str, String)]) -> std::io::Result<Self> {
        let foreground = in_terminal_foreground();
        let mut process = tokio::process::Command::new(std::env::current_exe()?);
        process
            .arg(EXEC_CHILD)
            .arg(getpid().to_string())
            .arg("--")
            .args(command)
            .envs(env.iter().map(|(k, v)| (k, v)));
        if foreground {
            // Processes CMD starts and leaves behind become our children, so that stopping CMD
            // reaches them too. Failure only narrows what a stop reaches.
            let _ = prctl::set_child_subreaper(true);
        } else {
            process.process_group(0);
        }
        let child = process.spawn()?;
        let pid = Pid::from_raw(child.id().expect("a child just started has a pid") as i32);
        Ok(Self {
            child,
            pid,
            foreground,
        })
    }

    /// Waits for CMD to exit.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }

    /// Sends `signal` to CMD and everything it started.
    pub fn signal(&self, signal: Signal) {
        if self.foreground {
            for pid in descendants(getpid()) {
                let _ = kill(pid, signal);
            }
        } else {
            let _ = killpg(self.pid, signal);
        }
    }

    /// Whether a signal `leasehold` got should be passed on to CMD: in the terminal's
    /// foreground group, CMD got the terminal's own (Ctrl-C, Ctrl-\, hang-up) already.
    pub fn should_forward(&self, signal: Signal) -> bool {
        !self.foreground || signal == Signal::SIGTERM
    }
}

/// True if `leasehold` runs in the foreground of a terminal (stdin, stdout or stderr): then CMD
/// must stay in the foreground group to use the terminal.
fn in_terminal_foreground() -> bool {
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()]
        .into_iter()
        .any(|fd| fd.is_terminal() && tcgetpgrp(fd).is_ok_and(|g| g == getpgrp()))
}

/// Every process descending from `root` now (from `/proc`), children first.
fn descendants(root: Pid) -> Vec<Pid> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root.as_raw()];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.into_iter().skip(1).map(Pid::from_raw).collect()
}

/// The shell convention: the code, or 128 + the signal that killed it.
pub(crate) fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => super::EXIT_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_include_grandchildren() -> std::io::Result<()> {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "(sleep 30; true) & wait"])
            .spawn()?;
        let shell = Pid::from_raw(child.id() as i32);
        // The grandchild appears once both shells have forked.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let found = loop {
            let found = descendants(shell);
            if found.len() >= 2 || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let _ = kill(shell, Signal::SIGKILL);
        for pid in &found {
            let _ = kill(*pid, Signal::SIGKILL);
        }
        child.wait()?;
        // The subshell and its `sleep`.
        assert!(found.len() >= 2, "{found:?}");
        Ok(())
    }
}
