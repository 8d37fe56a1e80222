//! One lock per `(stream, group, item)` on the control core, for custom streams: their storage
//! is a worker's, reached through separate `get` and `set` calls, so the engine serialises the
//! mutations of one item itself — an update's read-modify-write runs alone, and the events go
//! to the owner shard in the order the mutations took effect.
//!
//! Waiters are served first come, first served. Taking the lock is synchronous (the turn is
//! fixed when the call arrives); only the wait is a future. An entry exists only while some
//! call holds or waits for the item, so the table holds no more entries than calls in flight.

use futures_channel::oneshot;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::rc::Rc;

/// `(stream, group, item)`.
pub type ItemKey = (String, String, String);

/// The items held, each with its waiters in arrival order.
#[derive(Default)]
pub struct ItemLocks {
    held: RefCell<HashMap<ItemKey, VecDeque<oneshot::Sender<()>>>>,
}

/// An item's turn: held once the future of [`lock`] resolves. Dropping it, held or
/// still waiting, never strands the item: a held turn passes to the next waiter still
/// listening; a waiting one is skipped (or, if its turn came meanwhile, passed on).
pub struct ItemGuard<O: AsRef<ItemLocks>> {
    /// Whatever holds the table (the stream service), kept alive while the turn is held.
    owner: Rc<O>,
    key: ItemKey,
    /// `Some` while waiting for the holder before us to pass the turn.
    turn: Option<oneshot::Receiver<()>>,
}

/// Takes `key`'s place in line in `owner`'s table now; the future resolves when the turn
/// comes.
pub fn lock<O: AsRef<ItemLocks> + 'static>(owner: &Rc<O>, key: ItemKey) -> impl Future<Output = ItemGuard<O>> + 'static {
    let turn = {
        let mut held = (**owner).as_ref().held.borrow_mut();
        match held.get_mut(&key) {
            None => {
                held.insert(key.clone(), VecDeque::new());
                None
            }
            Some(queue) => {
                let (tx, rx) = oneshot::channel();
                queue.push_back(tx);
                Some(rx)
            }
        }
    };
    let mut guard = ItemGuard { owner: owner.clone(), key, turn };
    async move {
        if let Some(turn) = guard.turn.as_mut() {
            // The holder before us always passes the turn before it goes (see `Drop`), and
            // this guard keeps the table alive: the turn arrives.
            let _ = turn.await;
        }
        guard.turn = None;
        guard
    }
}

impl AsRef<ItemLocks> for ItemLocks {
    fn as_ref(&self) -> &ItemLocks {
        self
    }
}

impl ItemLocks {
    /// Items held or waited for.
    pub fn len(&self) -> usize {
        self.held.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<O: AsRef<ItemLocks>> Drop for ItemGuard<O> {
    fn drop(&mut self) {
        if let Some(mut turn) = self.turn.take() {
            // Still waiting: dropping the receiver makes the holder skip us — unless the
            // turn already came, in which case it is ours to pass on.
            if !matches!(turn.try_recv(), Ok(Some(()))) {
                return;
            }
        }
        let mut held = (*self.owner).as_ref().held.borrow_mut();
        let Some(queue) = held.get_mut(&self.key) else { return };
        // A waiter whose call was dropped no longer listens: skip it.
        while let Some(next) = queue.pop_front() {
            if next.send(()).is_ok() {
                return;
            }
        }
        held.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    fn key(item: &str) -> ItemKey {
        ("s".into(), "g".into(), item.into())
    }

    #[test]
    fn one_holder_per_item_in_arrival_order() {
        block_on(async {
            let locks = Rc::new(ItemLocks::default());
            let first = lock(&locks, key("a")).await;
            let mut second = Box::pin(lock(&locks, key("a")));
            let mut third = Box::pin(lock(&locks, key("a")));
            let other = lock(&locks, key("b")).await; // another item is not held up
            assert!(poll_once(&mut second).await.is_none());
            drop(first);
            assert!(poll_once(&mut third).await.is_none(), "the second comes first");
            let second = poll_once(&mut second).await.expect("the second's turn");
            drop(second);
            let third = poll_once(&mut third).await.expect("then the third's");
            drop((third, other));
            assert!(locks.is_empty(), "no entry is left once nobody holds or waits");
        });
    }

    #[test]
    fn a_waiter_that_gave_up_is_skipped() {
        block_on(async {
            let locks = Rc::new(ItemLocks::default());
            let first = lock(&locks, key("a")).await;
            let gone = lock(&locks, key("a"));
            let mut last = Box::pin(lock(&locks, key("a")));
            drop(gone);
            drop(first);
            let last = poll_once(&mut last).await.expect("the turn skips the dropped waiter");
            drop(last);
            assert!(locks.is_empty());
        });
    }

    #[test]
    fn a_turn_that_came_to_a_dropped_waiter_is_passed_on() {
        block_on(async {
            let locks = Rc::new(ItemLocks::default());
            let first = lock(&locks, key("a")).await;
            let second = lock(&locks, key("a"));
            let mut third = Box::pin(lock(&locks, key("a")));
            drop(first); // the turn goes to the second, which is never polled
            assert!(poll_once(&mut third).await.is_none());
            drop(second);
            let third = poll_once(&mut third).await.expect("the second's turn is passed on");
            drop(third);
            assert!(locks.is_empty());
        });
    }
}
