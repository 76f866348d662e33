//! Keeping the server's memory small and flat: the allocator is tuned (no per-thread caches, a
//! fixed mmap threshold), and a worker gives back the stack pages its deepest calls touched
//! before it settles into a long, shallow stream relay. The first and last each save about
//! 15 KiB per open stream (measured at 1000 streams).

use std::cell::Cell;

/// Four glibc settings, which glibc reads only from the environment at start-up, so the
/// server sets them and executes itself again, once, before it starts anything (a
/// `GLIBC_TUNABLES` the operator set, not empty, is left as it is):
/// - no per-thread cache of freed blocks (tcache): a worker frees a few hundred blocks while it
///   prepares a request, and with a thread per open stream those caches held 15 MB at 1000
///   streams; turning them off cost no measurable throughput (`make bench`);
/// - a fixed mmap threshold (glibc's default, 128 KiB): by default glibc raises it after
///   freeing a large block, so the usage ledger's queue (a few MB a second at full load) was
///   regrown inside the heap over and over and RSS climbed 1 MB a second under load; fixed,
///   large blocks go back to the kernel when freed and RSS stays flat;
/// - no cache of exited threads' stacks (up to 40 MiB, whose touched pages stay resident):
///   after a flood of 700 slow connections it held 2.5 MB of a pool that had shrunk back;
///   workers start rarely, so an mmap per start costs nothing;
/// - as many malloc arenas as cores (glibc's default is eight per core): no more threads run
///   at once than there are cores, and each arena keeps its own free pages; at 1000 streams
///   on 2 cores this held about 1 to 3 MB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TUNABLES: &str = "glibc.malloc.tcache_count=0:glibc.malloc.mmap_threshold=131072:glibc.pthread.stack_cache_size=0";

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "GLIBC_TUNABLES";
    if std::env::var_os(VAR).is_some_and(|v| !v.is_empty()) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let tunables = format!("{TUNABLES}:glibc.malloc.arena_max={cores}");
    let error = command.args(args).env(VAR, tunables).exec();
    warn!("could not restart with the allocator tuned ({error}); going on untuned");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

thread_local! {
    /// Near the top of this thread's stack, when the thread was started with `WORKER_STACK`.
    static TOP: Cell<usize> = const { Cell::new(0) };
}

/// Stack size of the threads that call `mark_top`.
pub const WORKER_STACK: usize = 256 * 1024;
/// Left alone below the caller's frame: the relay's own calls (reads, conversion) go this deep
/// again at once, and `madvise` itself runs there.
const MARGIN: usize = 4 * 1024;
const PAGE: usize = 4096;

fn here() -> usize {
    let marker = 0u8;
    std::hint::black_box(&marker) as *const u8 as usize
}

/// Records the calling thread's stack top; called first thing by a worker started with a
/// `WORKER_STACK` stack.
pub fn mark_top() {
    TOP.set(here());
}

/// Releases the pages of the calling thread's stack between half its size below the top (well
/// inside the mapping, whatever glibc keeps at its top) and `MARGIN` below the caller. Memory
/// below the stack pointer holds nothing live, and released pages come back zeroed if touched
/// again, so this changes how much memory the thread holds, never what it computes.
#[inline(never)]
pub fn release_unused() {
    let top = TOP.get();
    if top == 0 {
        return;
    }
    let low = (top - WORKER_STACK / 2).next_multiple_of(PAGE);
    let high = (here() - MARGIN) / PAGE * PAGE;
    if high > low {
        // SAFETY: `[low, high)` lies in this thread's stack (`TOP` is near its top, and the
        // stack is `WORKER_STACK` long) and below this frame less `MARGIN`: nothing live.
        #[allow(unsafe_code)]
        unsafe {
            crate::sys::dont_need(low, high - low);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn deep(n: usize) -> u64 {
        let mut block = [0u8; 1024];
        block[n % 1024] = n as u8;
        let below = if n == 0 { 0 } else { deep(n - 1) };
        std::hint::black_box(&block)
            .iter()
            .map(|&b| b as u64)
            .sum::<u64>()
            + below
    }

    #[test]
    fn releasing_keeps_the_thread_working() {
        let handle = std::thread::Builder::new()
            .stack_size(WORKER_STACK)
            .spawn(|| {
                mark_top();
                let first = deep(60);
                release_unused();
                // The released pages are touched again and must behave as fresh stack.
                let second = deep(60);
                release_unused();
                (first, second)
            })
            .expect("spawn");
        let (first, second) = handle.join().expect("thread ran");
        assert_eq!(first, second);
    }

    #[test]
    fn a_thread_without_a_mark_is_left_alone() {
        release_unused();
    }
}
