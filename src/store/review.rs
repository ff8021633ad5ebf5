//! The review surface's part of the store contract: what [`Store::review_summary`] and
//! [`Store::review_votes`] take and return (the owner's view of the votes; `review` serves it).
//!
//! Both read CURRENT votes: a changed vote counts once, with its last value, at the time of its
//! last change; a retracted vote is gone. Summaries read the hourly `vote_rollup` table the
//! vote triggers keep (see the backends' `0003_review.sql` and `0004_review_write_cost.sql`), so
//! their ranges are whole UTC hours; listings read `votes` newest first with a keyset cursor.
//!
//! [`Store::review_summary`]: super::Store::review_summary
//! [`Store::review_votes`]: super::Store::review_votes

use std::time::{Duration, SystemTime};

use crate::domain::{FeedbackValue, NEGATIVE_WORDS, POSITIVE_WORDS, Polarity, Thresholds, VoteKey};

use super::state::{DeliveryCursor, DeliveryState};

/// One hour in milliseconds: the rollup's grain.
pub const HOUR_MS: i64 = 3_600_000;

/// The votes a review query covers: updated in `[from, to)`, optionally of one assessment name
/// and one agent route (its configured path).
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewScope {
    pub from: SystemTime,
    pub to: SystemTime,
    pub name: Option<String>,
    pub route: Option<String>,
}

/// The deliveries not done yet, for the summary's delivery health. Counted through the
/// `deliveries_due` index over the unfinished states only, so its cost does not grow with the
/// delivered history (unlike `Store::delivery_stats`, which also counts `done`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub pending: u64,
    pub waiting: u64,
    pub dead: u64,
}

impl Backlog {
    /// Adds `count` deliveries in `state` (`done` is ignored).
    pub fn add(&mut self, state: DeliveryState, count: i64) {
        let n = u64::try_from(count).unwrap_or(0);
        match state {
            DeliveryState::Pending => self.pending += n,
            DeliveryState::Waiting => self.waiting += n,
            DeliveryState::Dead => self.dead += n,
            DeliveryState::Done => {}
        }
    }
}

/// Counts of current votes with one value, per bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryCell {
    /// Start of the bucket (a whole UTC hour or day).
    pub bucket: SystemTime,
    pub name: String,
    pub value: FeedbackValue,
    pub votes: i64,
    /// Of those, how many carry a comment.
    pub commented: i64,
}

/// What [`Store::review_summary`](super::Store::review_summary) groups by.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryQuery {
    /// `from` and `to` are rounded out to whole hours by the store.
    pub scope: ReviewScope,
    /// 1 (hourly) or 24 (daily, UTC days).
    pub bucket_hours: u32,
}

impl SummaryQuery {
    /// `[from, to)` as hours since the epoch, rounded out to whole hours.
    pub fn hours(&self) -> (i64, i64) {
        let ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        let from = ms(self.scope.from).div_euclid(HOUR_MS);
        let to = ms(self.scope.to)
            .saturating_add(HOUR_MS - 1)
            .div_euclid(HOUR_MS);
        (from, to)
    }

    /// The start of bucket number `b` (hours since the epoch divided by `bucket_hours`).
    pub fn bucket_start(&self, b: i64) -> SystemTime {
        let hours = b.saturating_mul(i64::from(self.bucket_hours.max(1)));
        let ms = u64::try_from(hours.saturating_mul(HOUR_MS)).unwrap_or(0);
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }
}

/// What [`Store::review_votes`](super::Store::review_votes) lists.
#[derive(Debug, Clone, PartialEq)]
pub struct ListQuery {
    pub scope: ReviewScope,
    /// Only votes of this polarity (`None`: all).
    pub polarity: Option<Polarity>,
    /// Only votes with (`true`) or without (`false`) a comment.
    pub has_comment: Option<bool>,
    pub thresholds: Thresholds,
    pub limit: u32,
}

/// A keyset position in a listing: (updated_at, key) of the last row shown, newest first. The
/// same token shape as the operators' delivery listing.
pub type ReviewCursor = DeliveryCursor;

/// One current vote, with what delivery knows about it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewedVote {
    pub key: VoteKey,
    pub chat_id: String,
    pub value: FeedbackValue,
    pub comment: Option<String>,
    pub updated_at: SystemTime,
    pub route: Option<String>,
    /// The delivery's state (`None` if it has no delivery row, which the store never leaves).
    pub delivery: Option<DeliveryState>,
    pub last_error: Option<String>,
    /// The trace the assessment lives on, else the message's linked trace.
    pub trace_id: Option<String>,
    /// The user's correction ("the right answer would have been…"): a dataset record's
    /// `expected_response`.
    pub correction: Option<String>,
}

impl ReviewedVote {
    /// The cursor that continues a listing after this row.
    pub fn cursor(&self) -> ReviewCursor {
        ReviewCursor {
            updated_at: self.updated_at,
            key: self.key.clone(),
        }
    }
}

/// The SQL `IN (...)` list of `words` as JSON string literals (`'"thumbs_up"', ...`), the form
/// both backends store string values in. Built from constants: nothing user-supplied.
pub(super) fn json_word_list(words: &[&str], cast: &str) -> String {
    words
        .iter()
        .map(|w| format!("'\"{w}\"'{cast}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The words of `p`.
pub(super) fn words(p: Polarity) -> &'static [&'static str] {
    match p {
        Polarity::Positive => &POSITIVE_WORDS,
        Polarity::Negative => &NEGATIVE_WORDS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_ranges_round_out_to_whole_hours() {
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let q = |from, to| SummaryQuery {
            scope: ReviewScope {
                from: at(from),
                to: at(to),
                name: None,
                route: None,
            },
            bucket_hours: 24,
        };
        assert_eq!(q(0, 3_600_000).hours(), (0, 1));
        assert_eq!(q(1, 3_600_001).hours(), (0, 2));
        assert_eq!(q(7_200_000, 7_200_000).hours(), (2, 2));
        assert_eq!(q(0, 0).bucket_start(2), at(2 * 24 * 3_600_000));
    }

    #[test]
    fn word_lists_are_sql_json_literals() {
        assert_eq!(
            json_word_list(&["up", "yes"], "::jsonb"),
            "'\"up\"'::jsonb, '\"yes\"'::jsonb"
        );
    }
}
