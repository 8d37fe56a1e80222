//! Group commit: writes applied to a group's store wait here until one fdatasync (on the sync
//! thread) makes them durable, then their replies and events are released in the order they
//! were applied; reads of a group with waiting writes wait behind them, and joins wait for the
//! commit under way so a snapshot never holds a write whose event is still waiting. A failed
//! commit answers errors and publishes nothing.
//!
//! `GroupCommit` is the bookkeeping alone (no I/O, no executor); `spawn_commit` drives it on
//! the shard's executor and `Syncer` is the sync thread.

use crate::group_ops::Applied;
use crate::messages::{GroupKey, GroupOpReply, JoinRequest};
use futures_channel::oneshot;
use ringcast_storage::file::FlushHandle;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// An applied operation whose reply (and event) has not been released yet.
pub struct Pending {
    pub key: GroupKey,
    pub applied: Applied,
    pub reply: oneshot::Sender<GroupOpReply>,
}

/// What `GroupCommit::admit` decided for an operation.
pub enum Admitted {
    /// Nothing to wait for: release it now.
    Release(Pending),
    /// Queued behind a commit; `start_commit`: no commit task runs yet, start one.
    Queued { start_commit: bool },
}

/// The commit queue of one shard.
pub struct GroupCommit {
    /// Whether writes wait for a commit at all (a file store with `durability` batch/always).
    enabled: bool,
    /// Applied but not yet durable, in the order applied.
    waiting: Vec<Pending>,
    /// Per group, writes in `waiting` or in the commit under way: reads of it wait.
    writes_per_group: HashMap<GroupKey, usize>,
    /// A commit task is running.
    committing: bool,
    /// Joins that must see only committed data; served when no commit is outstanding.
    deferred_joins: Vec<JoinRequest>,
    /// The inbox task, holding operations back until the deferred joins are served.
    joins_waker: Option<Waker>,
}

impl GroupCommit {
    /// `enabled`: writes wait for a commit; otherwise every operation is released at once.
    pub fn new(enabled: bool) -> Self {
        GroupCommit {
            enabled,
            waiting: Vec::new(),
            writes_per_group: HashMap::new(),
            committing: false,
            deferred_joins: Vec::new(),
            joins_waker: None,
        }
    }

    /// Takes an applied operation (`read`: it only read its group). A write waits for the next
    /// commit; a read waits too while its group has writes waiting, so no caller sees a value a
    /// crash (or a failed sync) could take back; anything else is released now.
    pub fn admit(&mut self, pending: Pending, read: bool) -> Admitted {
        let wrote = pending.applied.wrote;
        if !self.enabled || !(wrote || (read && self.writes_per_group.contains_key(&pending.key))) {
            return Admitted::Release(pending);
        }
        if wrote {
            *self.writes_per_group.entry(pending.key.clone()).or_default() += 1;
        }
        self.waiting.push(pending);
        let start_commit = !self.committing;
        self.committing = true;
        Admitted::Queued { start_commit }
    }

    /// Operations waiting for the next commit.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Takes every waiting operation for one fdatasync; `None` when there is none, and the
    /// commit task ends (`take_deferred_joins` then serves the joins that waited for it).
    pub fn next_batch(&mut self) -> Option<Vec<Pending>> {
        if self.waiting.is_empty() {
            self.committing = false;
            return None;
        }
        Some(std::mem::take(&mut self.waiting))
    }

    /// The batch's fdatasync ended with `outcome`: its operations, in order, ready to release
    /// (each turned into an error without event when the sync failed).
    pub fn settle(&mut self, batch: Vec<Pending>, outcome: &std::io::Result<()>) -> Vec<Pending> {
        batch
            .into_iter()
            .map(|mut pending| {
                if pending.applied.wrote {
                    self.write_settled(&pending.key);
                }
                if let Err(e) = outcome {
                    pending.applied = not_durable(pending.applied, e);
                }
                pending
            })
            .collect()
    }

    /// A write of `key` left the commit queue (answered either way).
    fn write_settled(&mut self, key: &GroupKey) {
        if let Some(count) = self.writes_per_group.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.writes_per_group.remove(key);
            }
        }
    }

    /// A join: `Some` to serve it now, `None` when it waits for the commit under way (the
    /// snapshot must not hold writes whose events are still waiting for the disk).
    pub fn defer_join(&mut self, join: JoinRequest) -> Option<JoinRequest> {
        if self.committing {
            self.deferred_joins.push(join);
            return None;
        }
        Some(join)
    }

    /// The joins that waited for the commit that just ended; wakes the inbox held back for them.
    pub fn take_deferred_joins(&mut self) -> Vec<JoinRequest> {
        if let Some(waker) = self.joins_waker.take() {
            waker.wake();
        }
        std::mem::take(&mut self.deferred_joins)
    }

    /// Ready once no join waits for a commit, so writes cannot starve a join.
    pub fn poll_joins_served(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.deferred_joins.is_empty() {
            return Poll::Ready(());
        }
        self.joins_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A write whose commit failed, or a read that waited for it: the caller gets an error and
/// subscribers no event. The store has stopped (fail-stop) and answers errors from now on.
fn not_durable(applied: Applied, error: &std::io::Error) -> Applied {
    let what = if applied.wrote { "the write could not be made durable" } else { "the read waited for a write that could not be made durable" };
    Applied {
        result: Err(("STREAM_STORE_ERROR".to_string(), format!("{what}: the file store failed ({error}); restart the engine"))),
        event: None,
        wrote: applied.wrote,
        stored_bytes: applied.stored_bytes,
    }
}

/// What the commit task needs of the shard it commits for.
pub trait CommitHost: 'static {
    fn group_commit(&mut self) -> &mut GroupCommit;
    /// Answers (and publishes) operations the commit settled, in order.
    fn release(&mut self, settled: Vec<Pending>);
    /// Serves the joins that waited for the commit.
    fn serve_deferred_joins(&mut self);
}

/// Starts a commit task: it lets the operations already in the inbox join (yielding while more
/// arrive, for at most `gather`), syncs them with one fdatasync, releases them, and repeats
/// until nothing waits; then it serves the deferred joins and ends.
pub fn spawn_commit<H: CommitHost>(host: Weak<RefCell<H>>, syncer: Rc<Syncer>, gather: Duration) {
    crate::runtime::spawn_deferred(async move {
        let started = std::time::Instant::now();
        loop {
            let before = host.upgrade().map_or(0, |h| h.borrow_mut().group_commit().waiting());
            futures_lite::future::yield_now().await;
            let after = host.upgrade().map_or(0, |h| h.borrow_mut().group_commit().waiting());
            if after == before || started.elapsed() >= gather {
                break;
            }
        }
        loop {
            let Some(this) = host.upgrade() else { return };
            let batch = this.borrow_mut().group_commit().next_batch();
            let Some(batch) = batch else {
                this.borrow_mut().serve_deferred_joins();
                return;
            };
            let outcome = syncer.sync().await;
            let mut h = this.borrow_mut();
            let settled = h.group_commit().settle(batch, &outcome);
            h.release(settled);
        }
    });
}

/// Runs fdatasync off the shard thread: one request at a time, answered on a oneshot.
pub struct Syncer {
    requests: std::sync::mpsc::Sender<oneshot::Sender<std::io::Result<()>>>,
}

impl Syncer {
    /// Starts the sync thread of shard `shard`, syncing through `handle`.
    pub fn start(handle: FlushHandle, shard: usize) -> Syncer {
        let (requests, inbox) = std::sync::mpsc::channel::<oneshot::Sender<std::io::Result<()>>>();
        let spawned = std::thread::Builder::new().name(format!("ringcast-sync-{shard}")).spawn(move || {
            for reply in inbox {
                let result = handle.sync();
                if let Some(why) = result.as_ref().err().and_then(|_| handle.failure_to_report()) {
                    crate::store::report_failure_text(format_args!("of shard {shard}"), &why);
                }
                let _ = reply.send(result);
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the sync thread of shard {shard}: {e}");
        }
        Syncer { requests }
    }

    /// Makes every write applied so far durable.
    pub async fn sync(&self) -> std::io::Result<()> {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(tx).is_err() {
            return Err(std::io::Error::other("the sync thread is gone"));
        }
        rx.await.unwrap_or_else(|_| Err(std::io::Error::other("the sync thread is gone")))
    }
}

