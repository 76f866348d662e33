//! The Linux calls std does not offer, through `libc` and `socket2`: dropping dead stack pages
//! (`memory`), a deeper accept queue and a way to stop accepting for the listener, receiving
//! signals on a thread of our own (`sigwait`) for shutdown and reload, a non-blocking peek at
//! a client socket (`watch`), and giving freed heap back after the worker pool shrinks. The
//! crate's `unsafe` blocks are here, each with its SAFETY line, and one in `memory` calling
//! `dont_need`, whose safety depends on its arguments.

use std::ffi::{c_int, c_void};

use socket2::SockRef;

/// Drops the pages of `[addr, addr + len)`: they read as zeros when touched again.
///
/// # Safety
///
/// The range must hold no live value: it lies in the calling thread's own stack, below its
/// stack pointer (`memory::release_unused` computes such a range).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub unsafe fn dont_need(addr: usize, len: usize) {
    // SAFETY: the caller guarantees the range holds nothing live; MADV_DONTNEED on private
    // anonymous memory only drops the pages, and the mapping stays valid.
    unsafe {
        libc::madvise(addr as *mut c_void, len, libc::MADV_DONTNEED);
    }
}

/// # Safety
///
/// As on Linux (here it does nothing).
#[cfg(not(target_os = "linux"))]
#[allow(unsafe_code)]
pub unsafe fn dont_need(_addr: usize, _len: usize) {}

/// std listens with a backlog of 128: a burst of new connections (a thousand clients opening
/// streams at once) overflows it, and the kernel drops SYNs that clients resend only after a
/// second. Listening again on a listening socket only changes its backlog; the kernel caps the
/// value at `net.core.somaxconn`.
pub fn deepen_backlog(listener: &std::net::TcpListener, backlog: c_int) -> std::io::Result<()> {
    SockRef::from(listener).listen(backlog)
}

/// The signals the server handles itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Hangup,
    Interrupt,
    Terminate,
}

impl Signal {
    /// Its number, for the conventional exit code 128 + number.
    pub fn number(self) -> i32 {
        match self {
            Signal::Hangup => 1,
            Signal::Interrupt => 2,
            Signal::Terminate => 15,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Hangup => "SIGHUP",
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }
}

/// SIGHUP, SIGINT and SIGTERM.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn handled_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, and sigemptyset initialises it before any other use;
    // the numbers added are valid signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [Signal::Hangup, Signal::Interrupt, Signal::Terminate] {
            libc::sigaddset(&mut set, signal.number());
        }
        set
    }
}

/// Blocks SIGHUP, SIGINT and SIGTERM in the calling thread and every thread it starts after
/// this, so they stay pending until `wait_signal` takes them. Call it before starting threads.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn block_signals() -> std::io::Result<()> {
    let set = handled_set();
    // SAFETY: `set` is a valid sigset_t; a null old set is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Waits for the next of the blocked signals.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn wait_signal() -> std::io::Result<Signal> {
    let set = handled_set();
    loop {
        let mut sig: c_int = 0;
        // SAFETY: `set` is a valid sigset_t and `sig` a writable int, both live for the call.
        let rc = unsafe { libc::sigwait(&set, &mut sig) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        match sig {
            1 => return Ok(Signal::Hangup),
            2 => return Ok(Signal::Interrupt),
            15 => return Ok(Signal::Terminate),
            _ => continue,
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub fn block_signals() -> std::io::Result<()> {
    Err(std::io::Error::other(
        "signal handling is implemented for Linux only",
    ))
}

#[cfg(not(target_os = "linux"))]
pub fn wait_signal() -> std::io::Result<Signal> {
    loop {
        std::thread::park();
    }
}

/// Stops a listening socket: a thread blocked in `accept` on it returns an error at once, and
/// new connections are refused. The descriptor stays open until the listener is dropped.
pub fn stop_listening(listener: &std::net::TcpListener) {
    let _ = SockRef::from(listener).shutdown(std::net::Shutdown::Both);
}
/// Peeks at one byte of a socket without blocking and without consuming it: `Ok(0)` is end
/// of stream, `WouldBlock` an open socket with nothing waiting. std's `peek` would block, and
/// making the socket non-blocking would change it for every holder of the descriptor.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn peek_nonblocking(fd: c_int) -> std::io::Result<usize> {
    let mut byte = 0u8;
    // SAFETY: the buffer is one byte we own for the duration of the call; a descriptor that is
    // not a socket (or no longer open) makes recv fail with an error, nothing more.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut byte).cast::<c_void>(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Elsewhere the client is never found gone early; the next write notices instead.
#[cfg(not(target_os = "linux"))]
pub fn peek_nonblocking(_fd: c_int) -> std::io::Result<usize> {
    Err(std::io::ErrorKind::WouldBlock.into())
}

/// Returns the free pages of every malloc arena to the system. glibc gives back only the top
/// of a heap on `free`; after a flood (700 slow connections) each of its 16 per-thread arenas
/// kept about 500 KiB of freed blocks resident, 8 MB in all, until this call (`listener`
/// makes it once per wave of retiring workers).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim_heap() {
    // SAFETY: malloc_trim only reorganises the allocator's own free lists and takes its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_heap() {}

/// Whether process `pid` exists (it may belong to another user).
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn is_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether process `pid` runs the same executable as this one (so a pid the kernel reused for
/// another program is never signalled).
pub fn runs_this_program(pid: u32) -> bool {
    let exe = |p: &str| std::fs::read_link(format!("/proc/{p}/exe")).ok();
    exe(&pid.to_string()).is_some_and(|theirs| Some(theirs) == exe("self"))
}

/// Asks process `pid` to reload (SIGHUP); a failure (another user's process) is ignored.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn hang_up(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill reads nothing of ours; the caller checked the process runs this program.
        unsafe {
            libc::kill(pid, libc::SIGHUP);
        }
    }
}
