//! Faults in the pages of the active segment ahead of the write cursor, on a helper thread.
//!
//! The first write to a page of a fresh mapping takes a page fault that allocates and zeroes a
//! page-cache page; for small records that is most of the cost of a write (on the VMs we
//! measured, 1.5–6 µs per 4 KiB page, i.e. about 20 records). The helper asks the kernel to
//! populate the next window of the mapping (`madvise`, Linux 5.14+), so the shard finds its pages
//! ready. `Populate::Write` maps them writable and dirty (no fault left for the writer);
//! `Populate::Read` only brings them into the page cache, because dirty zero pages ahead of the
//! cursor would be written out by every fdatasync of a durable store. On a kernel without these
//! `madvise` flags the helper stops populating and the writer faults as before.
//!
//! The same thread starts writeback of the pages the writer has left behind (so the sync when a
//! segment is sealed does not stall the shard for all 64 MiB at once), and prepares spare
//! segment files from reclaimed ones (see `spare`).

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;

use memmap2::MmapRaw;

/// How far ahead of the cursor pages are kept populated, in jobs of `CHUNK` bytes (small, so
/// the pages nearest the cursor are ready first).
const AHEAD: usize = 32 << 20;
const CHUNK: usize = 2 << 20;
/// How far behind the cursor writeback starts: past the records whose previous values a write
/// is likely to read back soon.
const LAG: usize = 4 << 20;

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
    /// Starts writeback of a range the writer is done with.
    WriteBehind { map: Arc<MmapRaw>, file: Arc<File>, range: Range<usize> },
    /// Turns a reclaimed segment file into a spare (see `spare`).
    Recycle(super::spare::Preparation),
    /// Answered once every earlier job is done.
    #[cfg(test)]
    Barrier(mpsc::Sender<()>),
}

/// The helper threads of one store; they end when this is dropped. Populating has a thread of
/// its own: the disk work (writeback, preparing a spare, whose sync can take a while) must not
/// hold up the pages the writer is about to need.
pub struct Prefaulter {
    jobs: Option<mpsc::Sender<Job>>,
    disk_jobs: Option<mpsc::Sender<Job>>,
}

/// A helper thread running the jobs sent to the returned channel.
fn spawn_helper(name: &str, populate: Populate) -> Option<mpsc::Sender<Job>> {
    let (jobs, inbox) = mpsc::channel::<Job>();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        let mut unsupported = false;
        for job in inbox {
            match job {
                Job::Populate { map, range } if !unsupported => {
                    // SAFETY: the range lies inside the mapping, which `map` keeps alive;
                    // populating changes no byte of it. Past the end of a file that was shortened
                    // meanwhile (a sealed segment) the call fails with EFAULT, no signal.
                    let done = unsafe {
                        libc::madvise(map.as_mut_ptr().add(range.start).cast(), range.len(), populate.advice())
                    };
                    if done != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                        unsupported = true; // kernel older than 5.14
                    }
                }
                Job::Populate { .. } => {}
                Job::WriteBehind { map, file, range } => write_behind(&map, &file, range),
                Job::Recycle(preparation) => preparation.run(),
                #[cfg(test)]
                Job::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
    });
    spawned.ok().map(|_| jobs)
}

impl Prefaulter {
    pub fn start(populate: Populate) -> Prefaulter {
        Prefaulter {
            jobs: spawn_helper("ringcast-prefault", populate),
            disk_jobs: spawn_helper("ringcast-writebk", populate),
        }
    }

    /// Asks for writeback of the chunks after `done` that lie more than `LAG` bytes behind the
    /// cursor `len`; returns the new end of the range handed over.
    pub fn behind(&self, map: &Arc<MmapRaw>, file: &Arc<File>, len: usize, mut done: usize) -> usize {
        let Some(jobs) = &self.disk_jobs else { return done };
        while done + CHUNK + LAG <= len {
            let range = done..done + CHUNK;
            let _ = jobs.send(Job::WriteBehind { map: map.clone(), file: file.clone(), range });
            done += CHUNK;
        }
        done
    }

    /// Has a helper prepare a spare segment file; false if there is no helper thread.
    pub fn recycle(&self, preparation: super::spare::Preparation) -> bool {
        self.disk_jobs.as_ref().is_some_and(|jobs| jobs.send(Job::Recycle(preparation)).is_ok())
    }

    /// Waits until every job sent so far is done.
    #[cfg(test)]
    pub fn wait_for_jobs(&self) {
        for jobs in [&self.jobs, &self.disk_jobs] {
            let (done, finished) = mpsc::channel();
            jobs.as_ref().expect("helper thread").send(Job::Barrier(done)).unwrap();
            finished.recv().unwrap();
        }
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

/// Unmaps `range` of the active segment's map and starts writing its pages back, without
/// waiting. Unmapped first, so the kernel does not write-protect each page it writes (a TLB
/// shootdown per page that would interrupt the writer's core); the page-cache pages stay, and a
/// later read faults them back in. The seal-time sync then only has the last few MiB to write.
fn write_behind(map: &MmapRaw, file: &File, range: Range<usize>) {
    // SAFETY: the range lies inside the mapping, which `map` keeps alive, and the writer is past
    // it; dropping page-table entries of a shared file mapping changes no byte (see
    // `Segment::unmap_pages`).
    unsafe {
        libc::madvise(map.as_mut_ptr().add(range.start).cast(), range.len(), libc::MADV_DONTNEED);
        libc::sync_file_range(
            file.as_raw_fd(),
            range.start as libc::off64_t,
            range.len() as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
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

    /// A new, preallocated file of `len` bytes in a fresh directory (returned for removal), with
    /// a shared map of it.
    fn scratch_map(tag: &str, len: usize) -> (std::path::PathBuf, Arc<File>, Arc<MmapRaw>) {
        let dir = std::env::temp_dir().join(format!("ringcast-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join("seg")).unwrap();
        // SAFETY: plain syscall on a file we own.
        assert_eq!(unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) }, 0);
        let map = Arc::new(MmapOptions::new().len(len).map_raw(&file).unwrap());
        (dir, Arc::new(file), map)
    }

    #[test]
    fn pages_ahead_of_the_cursor_become_resident_and_stay_zero() {
        let len = 4 << 20;
        let (dir, _file, map) = scratch_map("prefault", len);
        assert_eq!(resident_pages(&map), 0, "a fresh file has no cached pages");

        for populate in [Populate::Read, Populate::Write] {
            let prefaulter = Prefaulter::start(populate);
            assert_eq!(prefaulter.ahead(&map, 0, 0), len, "the whole (small) segment is asked for");
            assert_eq!(prefaulter.ahead(&map, 100, len), len, "nothing is asked for twice");
            prefaulter.wait_for_jobs();
            assert_eq!(resident_pages(&map), len / page_size());
        }
        // SAFETY: the mapping is alive and `len` bytes long.
        let bytes = unsafe { std::slice::from_raw_parts(map.as_ptr(), len) };
        assert!(bytes.iter().all(|&b| b == 0), "populating must not change the contents");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writeback_is_asked_for_whole_chunks_well_behind_the_cursor() {
        let len = 16 << 20;
        let (dir, file, map) = scratch_map("behind", len);
        // SAFETY: the mapping is alive and `len` bytes long; nothing else uses it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr(), len) };
        for (n, b) in bytes[..12 << 20].iter_mut().enumerate() {
            *b = (n % 251) as u8 + 1;
        }
        let prefaulter = Prefaulter::start(Populate::Write);
        assert_eq!(prefaulter.behind(&map, &file, CHUNK + LAG - 1, 0), 0, "nothing is LAG behind yet");
        let done = prefaulter.behind(&map, &file, 12 << 20, 0);
        assert_eq!(done, (12 << 20) - LAG, "whole chunks up to LAG behind the cursor");
        assert_eq!(prefaulter.behind(&map, &file, 12 << 20, done), done, "nothing is asked for twice");
        prefaulter.wait_for_jobs();
        // Unmapped and on its way to disk, but nothing changed, through the map or the file.
        assert!(bytes[..12 << 20].iter().enumerate().all(|(n, &b)| b == (n % 251) as u8 + 1));
        let on_file = std::fs::read(dir.join("seg")).unwrap();
        assert_eq!(&on_file[..12 << 20], &bytes[..12 << 20]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_populated_range_covers_the_window_past_the_cursor_within_the_map() {
        let map: Arc<MmapRaw> = Arc::new(MmapOptions::new().len(64 << 20).map_anon().unwrap().into());
        assert_eq!(Prefaulter { jobs: None, disk_jobs: None }.ahead(&map, 5000, 0), 0, "without a helper nothing is promised");
        let prefaulter = Prefaulter::start(Populate::Read);
        let end = prefaulter.ahead(&map, 5000, 0);
        assert!(end >= 5000 + AHEAD && end <= map.len(), "{end}");
        let near_the_end = map.len() - 100;
        assert_eq!(prefaulter.ahead(&map, near_the_end, end), map.len());
    }
}
