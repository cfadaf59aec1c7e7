//! Delayed leave events handed over to the server (MSC4195's delegation, as
//! lk-jwt-service offers it). A MatrixRTC client schedules its membership's leave as a
//! delayed event and, rather than restarting it every few seconds itself, hands it to
//! the server: while the member's participant is in the built-in SFU's call the leave
//! is kept waiting (restarted before it is due); once the participant has left the call
//! (hung up, or gone past the SFU's resume window) the leave is sent at once. Others
//! then see a crashed client leave within seconds, not after the hour-long delay a
//! delegating client picks.
//!
//! Who is in which call comes from the SFU ([`CallLeaves::joined`], [`CallLeaves::left`]);
//! the delegation itself is stored with the delayed event, so that it is watched again
//! after a restart of the server (which ended every call: the participant has a while
//! to come back before its leave is sent).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ruma::UserId;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::Instrument;
use trellis_core::{Error, Result, error::code, now_millis};

use crate::{Services, delayed_events::Action};

/// A participant of one of the SFU's calls: its LiveKit room and identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SfuSeat {
    pub room: String,
    pub identity: String,
}

/// How long a handed-over leave waits for its participant to be in the call: when it
/// was handed over before the participant joined, or was watched again after a restart.
/// Past that it is sent.
const CONNECT_WAIT: Duration = Duration::from_secs(60);
/// How long a participant must stay gone before its leave is sent: a client rejoining
/// with the same identity is taken out of the call a moment before it is taken in.
const LEFT_GRACE: Duration = Duration::from_secs(3);
/// The shortest time between two restarts of one leave, whatever its delay.
const RESTART_GAP_MS: u64 = 1_000;
/// The longest a watch sleeps before looking again (clocks may jump).
const LONGEST_SLEEP: Duration = Duration::from_secs(60);
/// After a restart failed for another reason than the event being gone.
const RETRY: Duration = Duration::from_secs(10);

struct Watch {
    delay_id: String,
    /// Tells this watch from a later one of the same seat and leave.
    generation: u64,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct State {
    /// Connections per participant: a participant may be counted in again before its
    /// old connection is counted out.
    present: HashMap<SfuSeat, usize>,
    /// One per seat, and one per leave.
    watches: HashMap<SfuSeat, Watch>,
    generations: u64,
}

#[derive(Default)]
pub struct CallLeaves {
    /// The built-in SFU runs and reports who is in its calls; without it nothing tells
    /// when a participant leaves, so nothing is taken over.
    offered: AtomicBool,
    state: Mutex<State>,
}

impl CallLeaves {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether leaves may be handed over here.
    pub fn offered(&self) -> bool {
        self.offered.load(Ordering::Acquire)
    }

    /// The built-in SFU runs: leaves may be handed over, and those handed over before a
    /// restart are watched again (the latest one where two name the same participant).
    pub fn attach(services: &Arc<Services>) {
        services.call_leaves.offered.store(true, Ordering::Release);
        match services.delayed_events.delegated() {
            Ok(delegated) => {
                for (delay_id, seat) in delegated {
                    if let Some(replaced) = services.call_leaves.watch(services, seat, delay_id) {
                        let services = services.clone();
                        tokio::spawn(async move { undelegate(&services, &replaced).await });
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the leaves handed over failed"),
        }
    }

    /// The SFU took `identity` into the call `room`.
    pub fn joined(&self, room: &str, identity: &str) {
        let seat = SfuSeat { room: room.to_owned(), identity: identity.to_owned() };
        let mut state = self.state();
        *state.present.entry(seat.clone()).or_default() += 1;
        if let Some(watch) = state.watches.get(&seat) {
            watch.wake.notify_one();
        }
    }

    /// The SFU took `identity` out of the call `room`.
    pub fn left(&self, room: &str, identity: &str) {
        let seat = SfuSeat { room: room.to_owned(), identity: identity.to_owned() };
        let mut state = self.state();
        if let Some(count) = state.present.get_mut(&seat) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.present.remove(&seat);
            }
        }
        if let Some(watch) = state.watches.get(&seat) {
            watch.wake.notify_one();
        }
    }

    /// Takes over `delay_id`, one of `user`'s delayed events waiting in `room_id`: sent
    /// when `seat` leaves its call. A leave handed over for the same participant before
    /// is no longer (it runs out on its own delay), nor is this one for another
    /// participant; handing the same over again changes nothing.
    pub async fn delegate(
        services: &Arc<Services>,
        user: &UserId,
        room_id: &str,
        seat: SfuSeat,
        delay_id: &str,
    ) -> Result<()> {
        if !services.call_leaves.offered() {
            return Err(Error::unrecognized("This server's SFU does not take over delayed leaves"));
        }
        services.delayed_events.delegate(user, delay_id, room_id, &seat).await?;
        tracing::info!(room = %seat.room, "a delayed leave was handed over");
        services.metrics.sfu.leaves_handed_over.inc();
        if let Some(replaced) = services.call_leaves.watch(services, seat, delay_id.to_owned()) {
            undelegate(services, &replaced).await;
        }
        Ok(())
    }

    /// Watches `delay_id` for `seat`, unless it is already. Answers the leave this one
    /// replaced for the seat, if any.
    fn watch(&self, services: &Arc<Services>, seat: SfuSeat, delay_id: String) -> Option<String> {
        let (generation, wake, replaced) = {
            let mut state = self.state();
            if let Some(watch) = state.watches.get(&seat)
                && watch.delay_id == delay_id
            {
                watch.wake.notify_one();
                return None;
            }
            // Watched for another participant until now: that watch ends.
            let other =
                state.watches.iter().find(|(_, w)| w.delay_id == delay_id).map(|(s, _)| s.clone());
            if let Some(watch) = other.and_then(|other| state.watches.remove(&other)) {
                watch.wake.notify_one();
            }
            state.generations += 1;
            let generation = state.generations;
            let wake = Arc::new(Notify::new());
            let watch = Watch { delay_id: delay_id.clone(), generation, wake: wake.clone() };
            let replaced = state.watches.insert(seat.clone(), watch).map(|old| {
                // It sees it was replaced and ends.
                old.wake.notify_one();
                old.delay_id
            });
            (generation, wake, replaced)
        };
        let span = tracing::info_span!("delegated_leave", room = %seat.room);
        tokio::spawn(run(services.clone(), seat, delay_id, generation, wake).instrument(span));
        replaced
    }

    /// Whether `seat` is in its call, or `None` when watch `generation` has ended.
    fn look(&self, seat: &SfuSeat, generation: u64) -> Option<bool> {
        let state = self.state();
        let current = state.watches.get(seat).is_some_and(|w| w.generation == generation);
        current.then(|| state.present.contains_key(seat))
    }

    /// Ends watch `generation` of `seat` (unless another replaced it).
    fn forget(&self, seat: &SfuSeat, generation: u64) {
        let mut state = self.state();
        if state.watches.get(seat).is_some_and(|w| w.generation == generation) {
            state.watches.remove(seat);
        }
    }
}

/// A replaced leave is no longer handed over, so that only the latest is watched again
/// after a restart.
async fn undelegate(services: &Services, delay_id: &str) {
    if let Err(e) = services.delayed_events.undelegate(delay_id).await {
        tracing::warn!(error = %e, "a replaced leave is still marked handed over");
    }
}

/// What a watch does next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// The participant left (or never came): the leave goes out.
    Send,
    Restart,
    Sleep(Duration),
}

/// The next step for a watched leave: `present` says whether the participant is in the
/// call, `gone_since` since when it has been out of it after being in it, and
/// `restart_due` (ms) when the delayed event wants restarting.
fn next_step(
    present: bool,
    gone_since: Option<Instant>,
    now: Instant,
    connect_by: Instant,
    now_ms: u64,
    restart_due: u64,
) -> Step {
    if !present {
        let send_at = gone_since.map_or(connect_by, |since| since + LEFT_GRACE);
        if now >= send_at {
            return Step::Send;
        }
        return Step::Sleep(send_at - now);
    }
    if now_ms >= restart_due {
        return Step::Restart;
    }
    Step::Sleep(Duration::from_millis(restart_due - now_ms))
}

/// When a delay that started at `running_since` wants restarting: once four fifths of
/// it have run, and no sooner than [`RESTART_GAP_MS`].
fn restart_due(running_since: u64, delay_ms: u64) -> u64 {
    running_since.saturating_add((delay_ms / 5 * 4).max(RESTART_GAP_MS))
}

fn gone(e: &Error) -> bool {
    e.errcode == code::NOT_FOUND
}

/// Watches one handed-over leave until it is sent, the client finishes it itself, or
/// another watch replaces this one.
async fn run(
    services: Arc<Services>,
    seat: SfuSeat,
    delay_id: String,
    generation: u64,
    wake: Arc<Notify>,
) {
    let leaves = &services.call_leaves;
    let delayed = &services.delayed_events;
    let connect_by = Instant::now() + CONNECT_WAIT;
    let (mut seen, mut gone_since) = (false, None);
    loop {
        let Some(present) = leaves.look(&seat, generation) else { return };
        seen |= present;
        gone_since = match (present, seen) {
            (false, true) => Some(gone_since.unwrap_or_else(Instant::now)),
            _ => None,
        };
        let record = delayed.waiting_record(&delay_id).ok().flatten();
        let Some(record) = record.filter(|r| r.leave_with.as_ref() == Some(&seat)) else {
            // Sent or cancelled (by the client, or its delay ran out), or handed over
            // for another participant since.
            leaves.forget(&seat, generation);
            return;
        };
        let due = restart_due(record.running_since, record.delay_ms);
        let step = next_step(present, gone_since, Instant::now(), connect_by, now_millis(), due);
        let pause = match step {
            Step::Send => {
                match delayed.update(&services, &delay_id, Action::Send, None).await {
                    Ok(()) => {
                        tracing::info!("the participant left the call: its leave was posted");
                        services.metrics.sfu.leaves_posted.inc();
                    }
                    Err(e) if gone(&e) => {}
                    Err(e) => tracing::warn!(error = %e, "sending a handed-over leave failed"),
                }
                leaves.forget(&seat, generation);
                return;
            }
            Step::Restart => {
                match delayed.update(&services, &delay_id, Action::Restart, None).await {
                    Ok(()) => continue,
                    Err(e) if gone(&e) => {
                        leaves.forget(&seat, generation);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "restarting a handed-over leave failed");
                        RETRY
                    }
                }
            }
            Step::Sleep(pause) => pause,
        };
        tokio::select! {
            () = tokio::time::sleep(pause.min(LONGEST_SLEEP)) => {}
            () = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leave_goes_out_once_its_participant_has_gone() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let step =
            |present, gone_since, now| next_step(present, gone_since, now, later, 1_000, 61_000);
        // In the call, the delay far from running out: it sleeps until the restart.
        assert_eq!(step(true, None, now), Step::Sleep(Duration::from_secs(60)));
        // Left after being there: sent once it has stayed gone a moment, however long
        // the delay has to run.
        assert_eq!(step(false, Some(now), now), Step::Sleep(LEFT_GRACE));
        assert_eq!(step(false, Some(now), now + LEFT_GRACE), Step::Send);
        // Not there yet: it waits for the participant until the connect deadline...
        assert_eq!(step(false, None, now), Step::Sleep(Duration::from_secs(30)));
        // ...and sends the leave if it never came.
        assert_eq!(step(false, None, later), Step::Send);
    }

    #[test]
    fn a_leave_is_restarted_when_four_fifths_of_its_delay_have_run() {
        let now = Instant::now();
        // An hour's delay started at t=0 wants restarting at 48 minutes.
        let due = restart_due(0, 3_600_000);
        assert_eq!(due, 2_880_000);
        assert_eq!(
            next_step(true, None, now, now, due - 1, due),
            Step::Sleep(Duration::from_millis(1))
        );
        assert_eq!(next_step(true, None, now, now, due, due), Step::Restart);
        // A tiny delay is not restarted in a loop.
        assert_eq!(restart_due(5_000, 3), 5_000 + RESTART_GAP_MS);
        assert_eq!(restart_due(u64::MAX, 10), u64::MAX);
    }

    fn watch(leaves: &CallLeaves, seat: &SfuSeat, delay_id: &str) -> u64 {
        let mut state = leaves.state();
        state.generations += 1;
        let generation = state.generations;
        let watch = Watch { delay_id: delay_id.into(), generation, wake: Arc::default() };
        state.watches.insert(seat.clone(), watch);
        generation
    }

    #[test]
    fn presence_counts_connections_and_a_replaced_watch_ends() {
        let leaves = CallLeaves::default();
        let seat = SfuSeat { room: "r".into(), identity: "i".into() };
        let first = watch(&leaves, &seat, "a");
        assert_eq!(leaves.look(&seat, first), Some(false));
        // A rejoin counted in before the old connection is counted out.
        leaves.joined("r", "i");
        leaves.joined("r", "i");
        leaves.left("r", "i");
        assert_eq!(leaves.look(&seat, first), Some(true));
        leaves.left("r", "i");
        assert_eq!(leaves.look(&seat, first), Some(false));
        // Replaced (by the same leave handed over again, or another): the old watch
        // sees it and stops, and forgetting it leaves the new one.
        let second = watch(&leaves, &seat, "a");
        assert_eq!(leaves.look(&seat, first), None);
        leaves.forget(&seat, first);
        assert_eq!(leaves.state().watches.len(), 1);
        leaves.forget(&seat, second);
        assert!(leaves.state().watches.is_empty());
    }
}
