//! Noticing a client that went away while the relay waits on a silent upstream.
//!
//! A relay learns that its client is gone only when it next writes to it, and with an upstream
//! that stays silent (a long thinking pause, a stalled stream) that can be the whole upstream
//! read timeout: a worker, an upstream connection and a token meter running for nobody. So
//! while a relay runs, its thread names the client's socket here (`watch`), and the upstream
//! transport (`ClientWatch`, in the ureq connector chain under TLS) waits for upstream bytes in
//! slices of at most `SLICE`, peeking at the client between slices. When the client has closed
//! or reset, the wait ends with an I/O error; ureq then drops the unfinished upstream
//! connection (a body not read to its end is never pooled), and the relay, seeing
//! `went_away()`, ends with `Outcome::ClientGone`.
//!
//! Outside a relay (the JSON path, the wait for the response head) nothing is sliced: the
//! transport forwards each call unchanged.

use std::cell::Cell;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use ureq::Error;
use ureq::unversioned::transport::time::Duration as UreqDuration;
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};

/// The longest an upstream wait goes without looking at the client.
const SLICE: std::time::Duration = std::time::Duration::from_millis(250);

thread_local! {
    /// The socket of the client this thread is relaying to, while a relay runs.
    static CLIENT: Cell<Option<RawFd>> = const { Cell::new(None) };
    /// Set when a sliced wait found the client gone.
    static GONE: Cell<bool> = const { Cell::new(false) };
    /// The socket of the client whose request this thread serves, before any answer.
    static WAITER: Cell<Option<RawFd>> = const { Cell::new(None) };
}

/// Names the client of the request this thread serves until dropped, for waits that come
/// before the upstream is asked (a queue for a slot).
pub struct Serving(());

/// Names `client` for `client_left`; the guard must not outlive the stream.
pub fn serving(client: &TcpStream) -> Serving {
    WAITER.set(Some(client.as_raw_fd()));
    Serving(())
}

impl Drop for Serving {
    fn drop(&mut self) {
        WAITER.set(None);
    }
}

/// Whether the client named by `serving` has closed or reset its connection.
pub fn client_left() -> bool {
    WAITER.get().is_some_and(client_gone)
}

/// Watches a client for as long as it lives; on drop the thread watches nothing.
pub struct Watching(());

/// Starts watching `client` on this thread. The guard must not outlive the stream.
pub fn watch(client: &TcpStream) -> Watching {
    CLIENT.set(Some(client.as_raw_fd()));
    GONE.set(false);
    Watching(())
}

impl Drop for Watching {
    fn drop(&mut self) {
        CLIENT.set(None);
    }
}

/// Whether the client watched on this thread was found gone during an upstream wait.
pub fn went_away() -> bool {
    GONE.get()
}

/// Whether the client has closed or reset its connection. Bytes waiting (a pipelined request)
/// and an empty, open socket both mean it is still there.
fn client_gone(fd: RawFd) -> bool {
    match crate::sys::peek_nonblocking(fd) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

/// The connector that wraps each new upstream transport in `Watched`.
#[derive(Debug)]
pub struct ClientWatch;

impl<In: Transport> Connector<In> for ClientWatch {
    type Out = Watched<In>;

    fn connect(
        &self,
        _: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, Error> {
        Ok(chained.map(|inner| Watched { inner }))
    }
}

/// An upstream transport whose waits for input look at the watched client between slices.
#[derive(Debug)]
pub struct Watched<T> {
    inner: T,
}

impl<T: Transport> Transport for Watched<T> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        self.inner.transmit_output(amount, timeout)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        let Some(fd) = CLIENT.get() else {
            return self.inner.await_input(timeout);
        };
        let real = timeout.for_read();
        // `None`: no deadline at all (ureq's "not happening" does not fit an Instant).
        let deadline = Instant::now().checked_add(*real.after);
        loop {
            let left = deadline.map_or(SLICE, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return Err(Error::Timeout(real.reason));
            }
            let slice = left.min(SLICE);
            // The slice that reaches the real deadline reports the real timeout.
            let last = deadline.is_some() && slice == left;
            let result = self.inner.await_input(NextTimeout {
                after: UreqDuration::Exact(slice),
                reason: real.reason,
                per_read: None,
                per_write: real.per_write,
            });
            match result {
                Err(Error::Timeout(_)) if !last => {
                    if client_gone(fd) {
                        GONE.set(true);
                        return Err(Error::Io(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the client went away",
                        )));
                    }
                }
                other => return other,
            }
        }
    }

    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}
