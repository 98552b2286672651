//! Where a claim starts scanning the keyless pending index (keyed rows
//! are found key by key, whatever their ids: see `store::CLAIM`).
//!
//! Published rows leave the pending index only once VACUUM may remove
//! their old versions. While something holds the xmin horizon (a long
//! REPEATABLE READ transaction, a pg_dump, a lagging slot) every claim
//! that scans from the lowest id walks through all the rows published
//! meanwhile: the drain rate fell from 7,789 to 2,384 msg/s over 150,000
//! rows. So claims start past a floor, and once per sweep interval (even
//! in a drain that never ends under steady load) a pass scans from 0.
//!
//! Ids are not commit order: a transaction may take id 10, commit after
//! id 11 was claimed, and be missed by a claim above 11. The floor is
//! therefore the highest id claimed at least [`LAG`] ago: only a row whose
//! transaction stayed open longer than that between its insert and its
//! commit can be skipped, and the sweep finds it, within one sweep
//! interval as before. The same holds for rows this relay gives back or
//! retries, and rows another relay leaves behind. While another session
//! holds the wake-up locks (typically a transaction that fired the trigger
//! early and runs long, whose row commits late) every claim scans from 0.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::Claimed;

/// How old a claim must be before the floor moves past it.
const LAG: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub(crate) struct Cursor {
    /// How often a pass scans from 0: the sweep interval.
    every: Duration,
    next_pass: Instant,
    /// Claims start after this id (0: from the beginning).
    floor: i64,
    /// The highest id of each recent claim, oldest first: the floor once
    /// [`LAG`] old.
    recent: VecDeque<(Instant, i64)>,
    /// A scan from the beginning (a sweep, rows given back), at this id.
    pass: Option<i64>,
}

impl Cursor {
    pub(crate) fn new(every: Duration) -> Cursor {
        Cursor {
            every,
            next_pass: Instant::now() + every,
            floor: 0,
            recent: VecDeque::new(),
            pass: None,
        }
    }

    /// The id the next claim starts after.
    pub(crate) fn start(&mut self, now: Instant) -> i64 {
        if now >= self.next_pass {
            self.next_pass = now + self.every;
            self.pass = Some(0);
        }
        while let Some(&(at, id)) = self.recent.front() {
            if now.duration_since(at) < LAG {
                break;
            }
            self.floor = self.floor.max(id);
            self.recent.pop_front();
        }
        let floor = self.floor;
        match self.pass {
            Some(at) if at < floor => at,
            _ => {
                self.pass = None;
                floor
            }
        }
    }

    /// Records a claim's rows (in id order; its keyed rows do not move the
    /// cursor); `exhausted` ends a pass.
    pub(crate) fn claimed(&mut self, now: Instant, rows: &[Claimed], exhausted: bool) {
        if let Some(last) = rows.iter().rfind(|row| row.ordering_key.is_none()) {
            if self.recent.back().is_none_or(|&(_, id)| id < last.id) {
                self.recent.push_back((now, last.id));
            }
            if let Some(at) = &mut self.pass {
                *at = (*at).max(last.id);
            }
        }
        if exhausted {
            self.pass = None;
        }
    }

    /// The next claims scan from the beginning until one finds no more.
    pub(crate) fn rewind(&mut self) {
        self.pass = Some(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn row(id: i64, key: Option<&str>) -> Claimed {
        Claimed {
            ordering_key: key.map(str::to_string),
            ..Claimed::for_test(id)
        }
    }

    fn rows(ids: std::ops::RangeInclusive<i64>) -> Vec<Claimed> {
        ids.map(|id| row(id, None)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_trails_the_claims_by_the_lag() {
        let mut cursor = Cursor::new(HOUR);
        let t0 = Instant::now();
        assert_eq!(cursor.start(t0), 0);
        cursor.claimed(t0, &rows(1..=10), false);
        // Too recent: a transaction holding id 5 may still commit.
        assert_eq!(cursor.start(t0 + LAG / 2), 0);
        cursor.claimed(t0 + LAG / 2, &rows(11..=20), false);
        assert_eq!(cursor.start(t0 + LAG), 10);
        assert_eq!(cursor.start(t0 + LAG * 2), 20);
        // An empty claim moves nothing.
        cursor.claimed(t0 + LAG * 2, &[], true);
        assert_eq!(cursor.start(t0 + LAG * 4), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rewind_scans_from_the_start_until_a_claim_comes_back_short() {
        let mut cursor = Cursor::new(HOUR);
        let t0 = Instant::now();
        cursor.claimed(t0, &rows(1..=100), false);
        let later = t0 + LAG;
        assert_eq!(cursor.start(later), 100);
        cursor.rewind();
        assert_eq!(cursor.start(later), 0);
        // The pass goes on from where it got to, below the floor.
        cursor.claimed(later, &rows(3..=7), false);
        assert_eq!(cursor.start(later), 7);
        cursor.claimed(later, &rows(40..=41), true);
        assert_eq!(cursor.start(later), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_starts_every_interval_however_busy() {
        let every = LAG * 4;
        let mut cursor = Cursor::new(every);
        let t0 = Instant::now();
        cursor.claimed(t0, &rows(1..=100), false);
        assert_eq!(cursor.start(t0 + LAG), 100);
        cursor.claimed(t0 + LAG, &rows(101..=200), false);
        assert_eq!(cursor.start(t0 + every), 0);
        cursor.claimed(t0 + every, &rows(7..=7), true);
        assert_eq!(cursor.start(t0 + every), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_that_reaches_the_floor_ends() {
        let mut cursor = Cursor::new(HOUR);
        let t0 = Instant::now();
        cursor.claimed(t0, &rows(1..=10), false);
        cursor.rewind();
        cursor.claimed(t0, &rows(1..=12), false);
        assert_eq!(cursor.start(t0 + LAG), 12);
        cursor.rewind();
        assert_eq!(cursor.start(t0 + LAG), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn keyed_rows_do_not_move_the_floor() {
        let mut cursor = Cursor::new(HOUR);
        let t0 = Instant::now();
        let claim = vec![row(5, None), row(6, Some("a")), row(900, Some("b"))];
        cursor.claimed(t0, &claim, false);
        assert_eq!(cursor.start(t0 + LAG), 5);
    }
}
