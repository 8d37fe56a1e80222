//! Faults in the pages of the active segment ahead of the write cursor, on a helper thread.
//!
//! The first write to a page of a fresh mapping takes a page fault that allocates and zeroes a
//! page-cache page; for small records that is most of the cost of a write (on the VMs we
//! measured, 1.5–6 µs per 4 KiB page, i.e. about 20 records). The helper asks the kernel to
//! populate the next window of the mapping (`madvise`, Linux 5.14+), so the shard finds its pages
//! ready. `Populate::Write` maps them writable and dirty (no fault left for the writer);
//! `Populate::Read` only brings them into the page cache, because dirty zero pages ahead of the
//! cursor would be written out by every fdatasync of a durable store. On a kernel without these
//! `madvise` flags the helper gives up quietly and the writer faults as before.

use std::ops::Range;
use std::sync::mpsc;
use std::sync::Arc;

use memmap2::MmapRaw;

/// How far ahead of the cursor pages are kept populated, in jobs of `CHUNK` bytes (small, so
/// the pages nearest the cursor are ready first).
const AHEAD: usize = 32 << 20;
const CHUNK: usize = 2 << 20;

/// What the helper does to the pages ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Populate {
    /// Page-cache pages only (`MADV_POPULATE_READ`): for stores that fdatasync.
    Read,
    /// Writable, dirty mappings (`MADV_POPULATE_WRITE`): for `durability: none`.
    Write,
}

impl Populate {
    fn advice(self) -> libc::c_int {
        // Values from linux/mman.h (the libc crate does not name them on every target).
        match self {
            Populate::Read => 22,
            Populate::Write => 23,
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

enum Job {
    Populate { map: Arc<MmapRaw>, range: Range<usize> },
    /// Answered once every earlier job is done.
    #[cfg(test)]
    Barrier(mpsc::Sender<()>),
}

/// The helper thread of one store; it ends when this is dropped.
pub struct Prefaulter {
    jobs: Option<mpsc::Sender<Job>>,
}

impl Prefaulter {
    pub fn start(populate: Populate) -> Prefaulter {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("ringcast-prefault".into())
            .spawn(move || {
                for job in inbox {
                    let (map, range) = match job {
                        Job::Populate { map, range } => (map, range),
                        #[cfg(test)]
                        Job::Barrier(done) => {
                            let _ = done.send(());
                            continue;
                        }
                    };
                    // SAFETY: the range lies inside the mapping, which `map` keeps alive;
                    // populating changes no byte of it. Past the end of a file that was shortened
                    // meanwhile (a sealed segment) the call fails with EFAULT, no signal.
                    let done = unsafe {
                        libc::madvise(map.as_mut_ptr().add(range.start).cast(), range.len(), populate.advice())
                    };
                    if done != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                        return; // kernel older than 5.14
                    }
                }
            });
        Prefaulter { jobs: spawned.ok().map(|_| jobs) }
    }

    /// Asks for the chunks after `populated` until `AHEAD` bytes past the cursor `len` are
    /// covered; returns the new end of the populated range.
    pub fn ahead(&self, map: &Arc<MmapRaw>, len: usize, mut populated: usize) -> usize {
        let Some(jobs) = &self.jobs else { return populated };
        let target = (len + AHEAD).min(map.len());
        if populated < len {
            populated = len & !(page_size() - 1); // madvise wants a page-aligned start
        }
        while populated < target {
            let end = (populated + CHUNK).min(map.len());
            let _ = jobs.send(Job::Populate { map: map.clone(), range: populated..end });
            populated = end;
        }
        populated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memmap2::MmapOptions;
    use std::os::fd::AsRawFd;

    /// Pages of `map` that are resident, by `mincore`.
    fn resident_pages(map: &MmapRaw) -> usize {
        let pages = map.len().div_ceil(page_size());
        let mut vec = vec![0u8; pages];
        // SAFETY: `vec` has one byte per page of the mapping.
        assert_eq!(unsafe { libc::mincore(map.as_mut_ptr().cast(), map.len(), vec.as_mut_ptr()) }, 0);
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    fn wait_for_jobs(prefaulter: &Prefaulter) {
        let (done, finished) = mpsc::channel();
        prefaulter.jobs.as_ref().expect("helper thread").send(Job::Barrier(done)).unwrap();
        finished.recv().unwrap();
    }

    #[test]
    fn pages_ahead_of_the_cursor_become_resident_and_stay_zero() {
        let dir = std::env::temp_dir().join(format!("ringcast-prefault-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join("seg")).unwrap();
        let len = 4 << 20;
        // SAFETY: plain syscall on a file we own.
        assert_eq!(unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) }, 0);
        let map = Arc::new(MmapOptions::new().len(len).map_raw(&file).unwrap());
        assert_eq!(resident_pages(&map), 0, "a fresh file has no cached pages");

        for populate in [Populate::Read, Populate::Write] {
            let prefaulter = Prefaulter::start(populate);
            assert_eq!(prefaulter.ahead(&map, 0, 0), len, "the whole (small) segment is asked for");
            assert_eq!(prefaulter.ahead(&map, 100, len), len, "nothing is asked for twice");
            wait_for_jobs(&prefaulter);
            assert_eq!(resident_pages(&map), len / page_size());
        }
        // SAFETY: the mapping is alive and `len` bytes long.
        let bytes = unsafe { std::slice::from_raw_parts(map.as_ptr(), len) };
        assert!(bytes.iter().all(|&b| b == 0), "populating must not change the contents");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_populated_range_covers_the_window_past_the_cursor_within_the_map() {
        let map: Arc<MmapRaw> = Arc::new(MmapOptions::new().len(64 << 20).map_anon().unwrap().into());
        assert_eq!(Prefaulter { jobs: None }.ahead(&map, 5000, 0), 0, "without a helper nothing is promised");
        let prefaulter = Prefaulter::start(Populate::Read);
        let end = prefaulter.ahead(&map, 5000, 0);
        assert!(end >= 5000 + AHEAD && end <= map.len(), "{end}");
        let near_the_end = map.len() - 100;
        assert_eq!(prefaulter.ahead(&map, near_the_end, end), map.len());
    }
}
