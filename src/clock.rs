//! The time every replica agrees on.
//!
//! A receive time decides conflicts (an update without a time of its own
//! takes effect when it is received, and a device's future times are
//! clamped to it), and the time decides whether a token has expired. A
//! replica whose clock is ten minutes off would decide both differently
//! from the others. So every replica reads the time as its own clock plus
//! an offset it measures to the database's clock, the one clock the
//! replicas share (PostgreSQL's log positions come from it already). A
//! SQLite store serves one process: its offset stays zero.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::timestamp::Timestamp;

/// An offset past this means the replica's own clock is wrong: it is
/// corrected, but logged (and shown by `mana_sync_clock_offset_seconds`)
/// so that an operator fixes the host's time keeping.
pub const OFFSET_ALARM: Duration = Duration::from_secs(1);

/// A measurement whose round trip took longer than this says too little
/// about the offset (it is known only to within half the round trip): it
/// is ignored, unless no measurement was taken yet.
const MAX_ROUND_TRIP: Duration = Duration::from_millis(100);

/// The shared time: this process's clock plus the measured offset. Cheap to clone.
#[derive(Clone, Default)]
pub struct Clock {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Nanoseconds to add to this process's clock.
    offset: AtomicI64,
    measured: AtomicBool,
    alarmed: AtomicBool,
}

impl Clock {
    /// The shared time now.
    pub fn now(&self) -> Timestamp {
        Timestamp(Timestamp::now().0.saturating_add(self.offset_nanos()))
    }

    /// The shared time now, in whole seconds since the Unix epoch (what
    /// token times are counted in).
    pub fn unix_seconds(&self) -> u64 {
        u64::try_from(self.now().0.div_euclid(1_000_000_000)).unwrap_or(0)
    }

    /// Nanoseconds this process's clock is behind the shared one (negative: ahead).
    pub fn offset_nanos(&self) -> i64 {
        self.inner.offset.load(Ordering::Relaxed)
    }

    /// Takes a measurement: the reference clock read `theirs` while ours
    /// went from `sent` to `received`. Returns the offset now in use.
    pub fn measured(&self, sent: Timestamp, theirs: Timestamp, received: Timestamp) -> i64 {
        let round_trip = received.0.saturating_sub(sent.0);
        let first = !self.inner.measured.swap(true, Ordering::Relaxed);
        if first || (0..=MAX_ROUND_TRIP.as_nanos() as i64).contains(&round_trip) {
            let midpoint = sent.0.saturating_add(round_trip / 2);
            let offset = theirs.0.saturating_sub(midpoint);
            self.inner.offset.store(offset, Ordering::Relaxed);
            let off = offset.unsigned_abs() > OFFSET_ALARM.as_nanos() as u64;
            if off && !self.inner.alarmed.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    offset_ms = offset / 1_000_000,
                    "this host's clock is off from the database's by more than {OFFSET_ALARM:?}: \
                     times are corrected, but fix the host's time keeping (NTP)"
                );
            } else if !off && self.inner.alarmed.swap(false, Ordering::Relaxed) {
                tracing::info!(
                    offset_ms = offset / 1_000_000,
                    "this host's clock agrees with the database's again"
                );
            }
        }
        self.offset_nanos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_the_reference_time_less_the_round_trips_midpoint() {
        let clock = Clock::default();
        assert_eq!(clock.offset_nanos(), 0);
        let ms = 1_000_000;
        // Ours went 1000 → 1010 ms while theirs read 600,005 ms: ten minutes ahead.
        let offset = clock.measured(Timestamp(1000 * ms), Timestamp(600_005 * ms), Timestamp(1010 * ms));
        assert_eq!(offset, 599_000 * ms);
        let before = Timestamp::now().0;
        let now = clock.now().0;
        assert!(
            now >= before + 599_000 * ms,
            "the shared time is ahead of ours by the offset"
        );
    }

    #[test]
    fn a_slow_round_trip_is_ignored_once_the_offset_is_known() {
        let clock = Clock::default();
        let ms = 1_000_000;
        clock.measured(Timestamp(0), Timestamp(5 * ms), Timestamp(10 * ms));
        assert_eq!(clock.offset_nanos(), 0);
        // Half a second there and back: the reading is too uncertain.
        clock.measured(Timestamp(0), Timestamp(400 * ms), Timestamp(500 * ms));
        assert_eq!(clock.offset_nanos(), 0);
        clock.measured(Timestamp(0), Timestamp(-595 * ms), Timestamp(10 * ms));
        assert_eq!(clock.offset_nanos(), -600 * ms, "a clock ahead of the reference");
    }

    #[test]
    fn whole_seconds_never_wrap() {
        let clock = Clock::default();
        clock.measured(Timestamp(0), Timestamp::MIN, Timestamp(0));
        assert_eq!(clock.unix_seconds(), 0);
    }
}
