//! Live allocations per user, for the quota, the observer and each user's bandwidth.
//!
//! The crate keeps its allocations to itself, so the ledger is built from the outside:
//! an allocation opens when the gate sees a successful Allocate response go out (matched
//! by transaction id to the authenticated request) and closes when the crate's
//! `alloc_close_notify` says so, whatever the cause (refresh to zero, expiry, shutdown).

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use ::turn::allocation::AllocationInfo;
use ::turn::allocation::five_tuple::FiveTuple;
use tokio::sync::mpsc;

use super::TurnObserver;
use super::bandwidth::SharedBucket;
use super::relay::RelayLink;

/// Nothing here panics while holding a lock, and a poisoned map is still the best
/// record there is.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ListenerId {
    Udp,
    Tcp,
}

/// What the gate knows of a live allocation: enough to speak for its client (the TCP
/// listener ends allocations of connections that closed with a Refresh of its own).
#[derive(Clone)]
pub(crate) struct Allocation {
    pub(crate) user: String,
    pub(crate) username: String,
    pub(crate) key: Vec<u8>,
    /// The latest nonce the crate accepted from this client.
    pub(crate) nonce: String,
    relay: Option<Arc<RelayLink>>,
}

impl Allocation {
    pub(crate) fn new(user: String, username: String, key: Vec<u8>, nonce: String) -> Self {
        Allocation { user, username, key, nonce, relay: None }
    }
}

struct UserEntry {
    live: usize,
    /// Allocate requests let through to the crate and not yet answered, so that two
    /// requests at once cannot both take the last slot.
    pending: usize,
    /// Lives as long as the user holds or awaits an allocation; one that comes back
    /// after holding none starts with a full bucket, which costs them an allocation
    /// round trip per second's burst.
    bucket: Option<SharedBucket>,
}

#[derive(Default)]
struct Books {
    users: HashMap<String, UserEntry>,
    allocations: HashMap<(ListenerId, FiveTuple), Allocation>,
    /// Relay sockets by the address announced for them.
    relays: HashMap<SocketAddr, Weak<RelayLink>>,
}

impl Books {
    fn forget_idle_user(&mut self, user: &str) {
        if self.users.get(user).is_some_and(|e| e.live == 0 && e.pending == 0) {
            self.users.remove(user);
        }
    }
}

type CloseSource = (ListenerId, mpsc::Receiver<AllocationInfo>);

pub(crate) struct Ledger {
    observer: Arc<dyn TurnObserver>,
    max_per_user: usize,
    bytes_per_sec: u64,
    books: Mutex<Books>,
    closes: Mutex<Vec<CloseSource>>,
}

impl Ledger {
    pub(crate) fn new(
        observer: Arc<dyn TurnObserver>,
        max_per_user: usize,
        bytes_per_sec: u64,
    ) -> Self {
        Ledger {
            observer,
            max_per_user,
            bytes_per_sec,
            books: Mutex::new(Books::default()),
            closes: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn add_close_source(
        &self,
        listener: ListenerId,
        rx: mpsc::Receiver<AllocationInfo>,
    ) {
        lock(&self.closes).push((listener, rx));
    }

    /// Applies closed notices as they come. Ends once every crate server and its
    /// allocations are gone (they hold the senders), so that the closes of a shutdown
    /// are still reported.
    pub(crate) async fn follow_closes(&self) {
        while let Some((listener, info)) = poll_fn(|cx| self.poll_close(cx)).await {
            self.closed(listener, &info.five_tuple);
        }
    }

    fn poll_close(&self, cx: &mut Context<'_>) -> Poll<Option<(ListenerId, AllocationInfo)>> {
        let mut sources = lock(&self.closes);
        let mut i = 0;
        while i < sources.len() {
            match sources[i].1.poll_recv(cx) {
                Poll::Ready(Some(info)) => return Poll::Ready(Some((sources[i].0, info))),
                Poll::Ready(None) => {
                    sources.swap_remove(i);
                }
                Poll::Pending => i += 1,
            }
        }
        if sources.is_empty() { Poll::Ready(None) } else { Poll::Pending }
    }

    /// Applies the closed notices already sent. The crate sends its notice before it
    /// answers the Refresh that ended the allocation, so a client that waits for that
    /// answer and allocates again is counted right even if `follow_closes` has not run.
    fn catch_up(&self) {
        let mut closed = Vec::new();
        for (listener, rx) in lock(&self.closes).iter_mut() {
            while let Ok(info) = rx.try_recv() {
                closed.push((*listener, info.five_tuple));
            }
        }
        for (listener, five_tuple) in closed {
            self.closed(listener, &five_tuple);
        }
    }

    /// Takes an allocation slot for `user` until the crate answers, or says the user is
    /// at quota.
    pub(crate) fn reserve(&self, user: &str) -> bool {
        self.catch_up();
        let mut books = lock(&self.books);
        let entry = books.users.entry(user.to_owned()).or_insert_with(|| UserEntry {
            live: 0,
            pending: 0,
            bucket: (self.bytes_per_sec > 0).then(|| SharedBucket::new(self.bytes_per_sec)),
        });
        if self.max_per_user > 0 && entry.live + entry.pending >= self.max_per_user {
            return false;
        }
        entry.pending += 1;
        true
    }

    /// Gives back a slot whose Allocate failed or was never answered.
    pub(crate) fn release(&self, user: &str) {
        let mut books = lock(&self.books);
        if let Some(entry) = books.users.get_mut(user) {
            entry.pending = entry.pending.saturating_sub(1);
        }
        books.forget_idle_user(user);
    }

    /// Turns a reserved slot into a live allocation.
    pub(crate) fn opened(
        &self,
        listener: ListenerId,
        five_tuple: FiveTuple,
        mut allocation: Allocation,
        relay_addr: Option<SocketAddr>,
    ) {
        let user = allocation.user.clone();
        let replaced = {
            let mut books = lock(&self.books);
            let link = relay_addr.and_then(|addr| books.relays.get(&addr)).and_then(Weak::upgrade);
            let entry = books.users.entry(user.clone()).or_insert_with(|| UserEntry {
                live: 0,
                pending: 1,
                bucket: (self.bytes_per_sec > 0).then(|| SharedBucket::new(self.bytes_per_sec)),
            });
            entry.pending = entry.pending.saturating_sub(1);
            entry.live += 1;
            if let Some(link) = &link {
                link.attach(entry.bucket.clone());
            }
            allocation.relay = link;
            let replaced = books.allocations.insert((listener, five_tuple), allocation);
            // The crate refuses a second allocation on one 5-tuple, so an old record
            // here means its closed notice was lost; count it closed now.
            if let Some(old) = &replaced {
                if let Some(entry) = books.users.get_mut(&old.user) {
                    entry.live = entry.live.saturating_sub(1);
                }
                books.forget_idle_user(&old.user);
            }
            replaced
        };
        if let Some(old) = replaced {
            self.observer.allocation_closed(&old.user);
        }
        tracing::debug!(%user, client = %five_tuple.src_addr, relay = ?relay_addr, "TURN allocation opened");
        self.observer.allocation_opened(&user);
    }

    fn closed(&self, listener: ListenerId, five_tuple: &FiveTuple) {
        let removed = {
            let mut books = lock(&self.books);
            let removed = books.allocations.remove(&(listener, *five_tuple));
            if let Some(allocation) = &removed {
                if let Some(entry) = books.users.get_mut(&allocation.user) {
                    entry.live = entry.live.saturating_sub(1);
                }
                books.forget_idle_user(&allocation.user);
            }
            removed
        };
        if let Some(allocation) = removed {
            tracing::debug!(user = %allocation.user, client = %five_tuple.src_addr, "TURN allocation closed");
            self.observer.allocation_closed(&allocation.user);
        }
    }

    pub(crate) fn allocation(
        &self,
        listener: ListenerId,
        five_tuple: &FiveTuple,
    ) -> Option<Allocation> {
        lock(&self.books).allocations.get(&(listener, *five_tuple)).cloned()
    }

    /// Records what an authenticated request the crate accepted tells: its nonce, and
    /// for CreatePermission and ChannelBind the peers now permitted.
    pub(crate) fn accepted(
        &self,
        listener: ListenerId,
        five_tuple: &FiveTuple,
        nonce: String,
        peers: &[IpAddr],
        permitted_until: Instant,
    ) {
        let link = {
            let mut books = lock(&self.books);
            let Some(allocation) = books.allocations.get_mut(&(listener, *five_tuple)) else {
                return;
            };
            allocation.nonce = nonce;
            allocation.relay.clone()
        };
        if let Some(link) = link {
            link.permit(peers, permitted_until);
        }
    }

    pub(crate) fn register_relay(&self, announced: SocketAddr, link: &Arc<RelayLink>) {
        lock(&self.books).relays.insert(announced, Arc::downgrade(link));
    }

    pub(crate) fn unregister_relay(&self, announced: SocketAddr, link: &RelayLink) {
        let mut books = lock(&self.books);
        // Only if it is still this socket's: the port may already serve a newer one.
        if books.relays.get(&announced).is_some_and(|weak| std::ptr::eq(weak.as_ptr(), link)) {
            books.relays.remove(&announced);
        }
    }

    #[cfg(test)]
    fn live(&self, user: &str) -> usize {
        lock(&self.books).users.get(user).map_or(0, |e| e.live)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::RefusalReason;
    use super::*;

    #[derive(Default)]
    struct Counts {
        opened: AtomicUsize,
        closed: AtomicUsize,
    }

    impl TurnObserver for Counts {
        fn allocation_opened(&self, _: &str) {
            self.opened.fetch_add(1, Ordering::SeqCst);
        }
        fn allocation_closed(&self, _: &str) {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
        fn relayed(&self, _: u64) {}
        fn refused(&self, _: RefusalReason) {}
    }

    fn tuple(port: u16) -> FiveTuple {
        FiveTuple {
            src_addr: SocketAddr::from(([192, 0, 2, 1], port)),
            dst_addr: SocketAddr::from(([192, 0, 2, 2], 3478)),
            ..Default::default()
        }
    }

    fn allocation(user: &str) -> Allocation {
        Allocation::new(user.into(), format!("1:{user}"), vec![1], "n".into())
    }

    #[tokio::test]
    async fn quota_counts_pending_and_live_and_frees_on_close() {
        let counts = Arc::new(Counts::default());
        let ledger = Ledger::new(counts.clone(), 2, 0);
        let (tx, rx) = mpsc::channel(4);
        ledger.add_close_source(ListenerId::Udp, rx);

        assert!(ledger.reserve("@a:x"));
        assert!(ledger.reserve("@a:x"));
        assert!(!ledger.reserve("@a:x"), "two pending fill the quota");
        assert!(ledger.reserve("@b:x"), "quotas are per user");
        ledger.release("@b:x");

        ledger.opened(ListenerId::Udp, tuple(1), allocation("@a:x"), None);
        ledger.release("@a:x");
        assert_eq!(ledger.live("@a:x"), 1);
        assert!(ledger.reserve("@a:x"));
        ledger.opened(ListenerId::Udp, tuple(2), allocation("@a:x"), None);
        assert!(!ledger.reserve("@a:x"));

        let info = AllocationInfo::new(tuple(1), "1:@a:x".into(), tuple(1).src_addr);
        tx.send(info).await.unwrap();
        // Counted at the next quota check, without waiting for `follow_closes`.
        assert!(ledger.reserve("@a:x"));
        assert_eq!(counts.opened.load(Ordering::SeqCst), 2);
        assert_eq!(counts.closed.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn closes_are_matched_per_listener() {
        let counts = Arc::new(Counts::default());
        let ledger = Ledger::new(counts.clone(), 0, 0);
        ledger.reserve("@a:x");
        ledger.opened(ListenerId::Udp, tuple(1), allocation("@a:x"), None);
        ledger.reserve("@a:x");
        ledger.opened(ListenerId::Tcp, tuple(1), allocation("@a:x"), None);
        ledger.closed(ListenerId::Tcp, &tuple(1));
        ledger.closed(ListenerId::Tcp, &tuple(1));
        assert_eq!(ledger.live("@a:x"), 1);
        assert!(ledger.allocation(ListenerId::Udp, &tuple(1)).is_some());
        assert_eq!(counts.closed.load(Ordering::SeqCst), 1);
    }
}
