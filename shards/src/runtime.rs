//! The runtime both kinds of core run on: core placement and executor start-up, task spawning,
//! accept loops, and the shutdown poll.
//!
//! One control executor serves the worker protocol; N shard executors own stream groups. Each is a
//! glommio `LocalExecutor` pinned to a CPU. io_uring registers each executor's I/O buffer as
//! locked memory (once per ring, three rings), so the buffer size is chosen to fit the process's
//! `RLIMIT_MEMLOCK`. Each core runs until the shutdown flag (set by the signal handler) is seen
//! by `until_shutdown`, stops its listener with `stop_listening`, and gives its writers
//! `SHUTDOWN_GRACE` to flush close frames.

use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use std::fmt;
use std::future::Future;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Rings per glommio executor that register the I/O buffer (main, latency, poll).
const RINGS_PER_EXECUTOR: usize = 3;
/// glommio never uses less than this for the I/O buffer.
pub const MIN_IO_MEMORY: usize = 64 << 10;
/// What we ask for when the limit allows it: ringcast does network I/O, not O_DIRECT files.
pub const PREFERRED_IO_MEMORY: usize = 512 << 10;

/// The CPUs this process may run on (its affinity mask), in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            return (0..n).collect();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect()
    }
}

/// Why the executors cannot be placed as asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    #[error("--control-core {cpu} is not a CPU this process may run on (allowed: {allowed:?})")]
    ControlCpuNotAllowed { cpu: usize, allowed: Vec<usize> },
    #[error("--shards must be at least 1")]
    NoShards,
}

/// An executor that could not be started.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot start executor {name} on CPU {cpu}: {source} (if this is an out-of-memory or \
     permission error from io_uring, raise the locked memory limit with `ulimit -l` or start \
     fewer shards with --shards)"
)]
pub struct SpawnError {
    pub name: String,
    pub cpu: usize,
    pub source: glommio::GlommioError<()>,
}

/// Where each executor runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorePlan {
    pub control_cpu: usize,
    pub shard_cpus: Vec<usize>,
}

impl CorePlan {
    /// Places the control executor on `control_cpu` (default: the first CPU) and `shards` shard
    /// executors (default: one per remaining CPU, at least one) round-robin over the other CPUs,
    /// adding the control CPU to the rotation when there are more shards than other CPUs.
    pub fn new(cpus: &[usize], shards: Option<usize>, control_cpu: Option<usize>) -> Result<Self, PlacementError> {
        let cpus = if cpus.is_empty() { &[0][..] } else { cpus };
        let control_cpu = control_cpu.unwrap_or(cpus[0]);
        if !cpus.contains(&control_cpu) {
            return Err(PlacementError::ControlCpuNotAllowed { cpu: control_cpu, allowed: cpus.to_vec() });
        }
        let shards = shards.unwrap_or(cpus.len().saturating_sub(1).max(1));
        if shards == 0 {
            return Err(PlacementError::NoShards);
        }
        // Shards go on the other CPUs first; only when there are more shards than those do they
        // also share the control core's CPU.
        let mut pool: Vec<usize> = cpus.iter().copied().filter(|&cpu| cpu != control_cpu).collect();
        if pool.is_empty() || shards > pool.len() {
            pool.push(control_cpu);
        }
        let shard_cpus = (0..shards).map(|i| pool[i % pool.len()]).collect();
        Ok(CorePlan { control_cpu, shard_cpus })
    }

    pub fn executor_count(&self) -> usize {
        1 + self.shard_cpus.len()
    }

    /// Whether more than one executor runs on `cpu`. Such executors should not spin when idle:
    /// polling would only hold the CPU from the neighbour that has work.
    pub fn is_shared(&self, cpu: usize) -> bool {
        let on_cpu = usize::from(self.control_cpu == cpu) + self.shard_cpus.iter().filter(|&&c| c == cpu).count();
        on_cpu > 1
    }
}

/// Why the locked-memory budget does not allow the executors to start.
#[derive(Debug)]
pub struct MemlockError {
    pub limit_bytes: u64,
    pub needed_bytes: u64,
}

impl fmt::Display for MemlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "locked memory limit (ulimit -l) is {} KiB but {} KiB are needed for io_uring buffers; \
             raise it (`ulimit -l {}` in the start script, or LimitMEMLOCK= in the systemd unit) \
             or start fewer shards with --shards",
            self.limit_bytes / 1024,
            self.needed_bytes / 1024,
            self.needed_bytes.div_ceil(1024)
        )
    }
}

impl std::error::Error for MemlockError {}

/// Chooses the per-executor I/O buffer size that fits `limit_bytes` of locked memory, or says
/// how much is missing. `None` = unlimited (or the process may lock memory without limit).
pub fn io_memory_per_executor(executors: usize, limit_bytes: Option<u64>) -> Result<usize, MemlockError> {
    let Some(limit) = limit_bytes else {
        return Ok(PREFERRED_IO_MEMORY);
    };
    // Keep a quarter of the limit for anything else that locks memory.
    let budget = limit - limit / 4;
    let per_executor = budget as usize / (executors * RINGS_PER_EXECUTOR);
    let io_memory = (per_executor.min(PREFERRED_IO_MEMORY) / MIN_IO_MEMORY) * MIN_IO_MEMORY;
    if io_memory < MIN_IO_MEMORY {
        let needed = (executors * RINGS_PER_EXECUTOR * MIN_IO_MEMORY) as u64 * 4 / 3;
        return Err(MemlockError { limit_bytes: limit, needed_bytes: needed });
    }
    Ok(io_memory)
}

/// The locked-memory limit that applies to this process: `None` when unlimited or when the
/// process has CAP_IPC_LOCK (root), which io_uring honours.
pub fn memlock_limit() -> Option<u64> {
    let mut rlim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass; RLIMIT_MEMLOCK is a valid resource.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rlim) };
    if rc != 0 || rlim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return None;
    }
    Some(rlim.rlim_cur)
}

/// Starts a pinned executor on its own thread running `fut_gen()`. When idle it polls for
/// `spin` before it sleeps in the kernel: work arriving within that window is served without a
/// wake-up (tens of microseconds saved per hop).
pub fn spawn_pinned<G, F, T>(
    name: &str,
    cpu: usize,
    io_memory: usize,
    spin: std::time::Duration,
    fut_gen: G,
) -> Result<glommio::ExecutorJoinHandle<T>, SpawnError>
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name(name)
        .io_memory(io_memory)
        .spin_before_park(spin)
        .spawn(fut_gen)
        .map_err(|source| SpawnError { name: name.to_string(), cpu, source })
}

/// Milliseconds since the Unix epoch: event timestamps, worker connection times.
pub fn unix_time_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// How often a core looks at the shutdown flag set by the signal handler.
pub const SHUTDOWN_POLL: Duration = Duration::from_millis(25);
/// Time given to writers to flush close frames and error answers before an executor stops.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);
/// Pause after a failed accept (out of file descriptors, say) before the next one.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Spawns a task on this executor that starts only after the current task yields (it yields
/// once first). glommio may poll a new task at once; callers that hold their core's state
/// borrowed (a control-core handler, a shard's inbox handler) call this, and the task borrows
/// the state too. Work queued by the current burst runs before it.
pub fn spawn_deferred(fut: impl Future<Output = ()> + 'static) {
    glommio::spawn_local(async move {
        let mut yielded = false;
        std::future::poll_fn(|cx| {
            if yielded {
                std::task::Poll::Ready(())
            } else {
                yielded = true;
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        })
        .await;
        fut.await
    })
    .detach();
}

/// Takes a bound, listening TCP socket (bound by the boot code, so bind errors are reported
/// before any executor starts): the executor's listener, and the fd `stop_listening` needs.
pub fn listener(fd: OwnedFd) -> (TcpListener, RawFd) {
    let fd = fd.into_raw_fd();
    // SAFETY: a bound, listening TCP socket whose ownership we take here.
    (unsafe { TcpListener::from_raw_fd(fd) }, fd)
}

/// Accepts connections on `listener` until shutdown, serving each on a task of its own. An
/// accept that fails once `stopping` is set ends the loop; other failures are logged (`port`
/// names the listener) and retried after a pause.
pub fn spawn_accept_loop<F, Fut>(listener: TcpListener, port: String, stopping: Arc<AtomicBool>, serve: F)
where
    F: Fn(TcpStream) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    glommio::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    glommio::spawn_local(serve(stream)).detach();
                }
                Err(_) if stopping.load(Ordering::Relaxed) => return,
                Err(e) => {
                    tracing::warn!("{port} accept failed: {e}");
                    glommio::timer::sleep(ACCEPT_RETRY_PAUSE).await;
                }
            }
        }
    })
    .detach();
}

/// Resolves once `shutdown` is set (looked at every `SHUTDOWN_POLL`).
pub async fn until_shutdown(shutdown: &AtomicBool) {
    while !shutdown.load(Ordering::Relaxed) {
        glommio::timer::sleep(SHUTDOWN_POLL).await;
    }
}

/// Ends the pending accept on a listening socket, so the port is free the moment the process
/// exits (an accept still queued in io_uring would keep it bound a little longer).
pub fn stop_listening(fd: RawFd) {
    // SAFETY: shutdown(2) on a listening socket we own; it only wakes its pending accept.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_uses_remaining_cores() {
        let plan = CorePlan::new(&[0, 1, 2, 3], None, None).unwrap();
        assert_eq!(plan, CorePlan { control_cpu: 0, shard_cpus: vec![1, 2, 3] });
    }

    #[test]
    fn executors_sharing_a_cpu_are_told_apart() {
        let plan = CorePlan::new(&[0, 1], Some(2), None).unwrap();
        assert_eq!(plan, CorePlan { control_cpu: 0, shard_cpus: vec![1, 0] });
        assert!(plan.is_shared(0));
        assert!(!plan.is_shared(1));
        assert!(!CorePlan::new(&[0, 1], Some(1), None).unwrap().is_shared(0));
    }

    #[test]
    fn one_cpu_host_shares_the_control_cpu() {
        let plan = CorePlan::new(&[0], None, None).unwrap();
        assert_eq!(plan, CorePlan { control_cpu: 0, shard_cpus: vec![0] });
    }

    #[test]
    fn more_shards_than_cpus_wrap_around() {
        let plan = CorePlan::new(&[0, 1], Some(3), Some(1)).unwrap();
        assert_eq!(plan, CorePlan { control_cpu: 1, shard_cpus: vec![0, 1, 0] });
        let plan = CorePlan::new(&[0, 1, 2], Some(2), None).unwrap();
        assert_eq!(plan.shard_cpus, vec![1, 2], "the control CPU is used only when needed");
    }

    #[test]
    fn bad_control_core_and_zero_shards_are_errors() {
        assert!(CorePlan::new(&[0, 1], None, Some(2)).is_err());
        assert!(CorePlan::new(&[0, 1], Some(0), None).is_err());
    }

    #[test]
    fn io_memory_fits_the_default_8_mib_limit() {
        let io = io_memory_per_executor(3, Some(8 << 20)).unwrap();
        assert!(io >= MIN_IO_MEMORY && 3 * RINGS_PER_EXECUTOR * io <= 8 << 20);
    }

    #[test]
    fn too_small_a_limit_says_how_much_is_needed() {
        let err = io_memory_per_executor(8, Some(64 << 10)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("ulimit -l"), "{text}");
        assert!(err.needed_bytes > err.limit_bytes);
    }

    #[test]
    fn unlimited_gets_the_preferred_size() {
        assert_eq!(io_memory_per_executor(16, None).unwrap(), PREFERRED_IO_MEMORY);
    }
}
