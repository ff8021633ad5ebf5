//! Every row type the SQLite store returns, decoded by column name in exactly one function
//! each: a delivery, a vote, a message link, a reviewed vote. The order of a SELECT or
//! RETURNING list does not matter.
//!
//! The decoders are rusqlite row closures, which can only fail with a rusqlite error; a row
//! that reads but does not decode (an unknown state, a value that is not JSON) is therefore
//! `Ok(Err(StoreError::Corrupt(..)))`, a [`Decoded`].
//!
//! A new column of one of these rows: the migration, the statements that write it, and the
//! decoder here (plus `delivery_columns!` for a delivery column).

use rusqlite::Row;

use super::conn::from_ms;
use crate::store::api::{Delivery, MessageLink, ReviewedVote, StoreError, Vote, VoteKey};
use crate::store::codec;

/// The columns every query returning deliveries selects (any order: [`delivery`] reads them
/// by name).
macro_rules! delivery_columns {
    () => {
        "message_id, user_id, name, chat_id, desired, desired_value, desired_comment, version, \
         assessment_id, generation, trace_id, state, attempts, next_attempt_at, enqueued_at, \
         last_error, updated_at, claims"
    };
}

/// A decoded row, or why it could not be read (outer) or decoded (inner).
pub(super) type Decoded<T> = rusqlite::Result<Result<T, StoreError>>;

fn key(r: &Row<'_>) -> rusqlite::Result<VoteKey> {
    Ok(VoteKey {
        message_id: r.get("message_id")?,
        user_id: r.get("user_id")?,
        name: r.get("name")?,
    })
}

/// A row selected with `delivery_columns!()`.
pub(super) fn delivery(r: &Row<'_>) -> Decoded<Delivery> {
    let key = key(r)?;
    let chat_id = r.get("chat_id")?;
    let desired: String = r.get("desired")?;
    let desired_value: Option<String> = r.get("desired_value")?;
    let desired_comment = r.get("desired_comment")?;
    let version = r.get("version")?;
    let assessment_id = r.get("assessment_id")?;
    let generation = r.get("generation")?;
    let trace_id = r.get("trace_id")?;
    let state: String = r.get("state")?;
    let attempts = r.get("attempts")?;
    let next_attempt_at = from_ms(r.get("next_attempt_at")?);
    let enqueued_at = from_ms(r.get("enqueued_at")?);
    let last_error = r.get("last_error")?;
    let updated_at = from_ms(r.get("updated_at")?);
    let claims = r.get("claims")?;
    Ok((|| {
        let value = desired_value
            .as_deref()
            .map(serde_json::from_str::<serde_json::Value>)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("delivery value is not JSON: {e}")))?;
        Ok(Delivery {
            key,
            chat_id,
            desired: codec::desired(&desired, value, desired_comment)?,
            version,
            assessment_id,
            generation,
            trace_id,
            state: codec::state(&state)?,
            attempts,
            next_attempt_at,
            enqueued_at,
            last_error,
            updated_at,
            claims,
        })
    })())
}

/// A row of `votes` (`message_id, user_id, name, chat_id, value, comment, updated_at,
/// expected_response`).
pub(super) fn vote(r: &Row<'_>) -> Decoded<Vote> {
    let key = key(r)?;
    let chat_id = r.get("chat_id")?;
    let value: String = r.get("value")?;
    let comment = r.get("comment")?;
    let updated_at = from_ms(r.get("updated_at")?);
    let expected_response = r.get("expected_response")?;
    Ok(codec::value_from_text(&value).map(|value| Vote {
        key,
        chat_id,
        value,
        comment,
        expected_response,
        updated_at,
    }))
}

/// A row of `message_links` (all its columns). Nothing in it can fail to decode once read.
pub(super) fn link(r: &Row<'_>) -> rusqlite::Result<MessageLink> {
    Ok(MessageLink {
        message_id: r.get("message_id")?,
        chat_id: r.get("chat_id")?,
        user_id: r.get("user_id")?,
        trace_id: r.get("trace_id")?,
        client_request_id: r.get("client_request_id")?,
        open: r.get("open")?,
        created_at: from_ms(r.get("created_at")?),
        updated_at: from_ms(r.get("updated_at")?),
        route: r.get("route")?,
    })
}

/// A row of the review listing: a vote's columns, its delivery's `state`, `last_error` and
/// `trace_id` (NULL without a delivery).
pub(super) fn reviewed(r: &Row<'_>) -> Decoded<ReviewedVote> {
    let key = key(r)?;
    let chat_id = r.get("chat_id")?;
    let value: String = r.get("value")?;
    let comment = r.get("comment")?;
    let updated_at = from_ms(r.get("updated_at")?);
    let route = r.get("route")?;
    let state: Option<String> = r.get("state")?;
    let last_error = r.get("last_error")?;
    let trace_id = r.get("trace_id")?;
    let correction = r.get("expected_response")?;
    Ok((|| {
        Ok(ReviewedVote {
            key,
            chat_id,
            value: codec::value_from_text(&value)?,
            comment,
            updated_at,
            route,
            delivery: state.as_deref().map(codec::state).transpose()?,
            last_error,
            trace_id,
            correction,
        })
    })())
}

#[cfg(test)]
mod tests {
    //! Each decoder reads a literal row whose columns come in the usual order and reversed:
    //! both must decode to the same, expected value (a positional decoder fails the reversed
    //! one).

    use std::time::{Duration, UNIX_EPOCH};

    use rusqlite::Connection;

    use super::*;
    use crate::domain::FeedbackValue;
    use crate::store::api::{DeliveryState, Desired};

    /// `SELECT <literal> AS <column>, …` in the given order, then reversed; the decoded rows.
    fn both_orders<T>(
        columns: &[(&str, &str)],
        decode: impl Fn(&Row<'_>) -> rusqlite::Result<T>,
    ) -> [T; 2] {
        let conn = Connection::open_in_memory().expect("in-memory SQLite");
        let select = |cols: &mut dyn Iterator<Item = &(&str, &str)>| {
            let list: Vec<String> = cols.map(|(c, lit)| format!("{lit} AS {c}")).collect();
            format!("SELECT {}", list.join(", "))
        };
        let forward = select(&mut columns.iter());
        let reversed = select(&mut columns.iter().rev());
        [forward, reversed].map(|sql| {
            conn.query_row(&sql, [], &decode)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
    }

    fn at(ms: u64) -> std::time::SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn key() -> VoteKey {
        VoteKey {
            message_id: "m1".into(),
            user_id: "u1".into(),
            name: "user_feedback".into(),
        }
    }

    #[test]
    fn a_delivery_is_decoded_by_column_name() {
        let columns = [
            ("message_id", "'m1'"),
            ("user_id", "'u1'"),
            ("name", "'user_feedback'"),
            ("chat_id", "'c1'"),
            ("desired", "'upsert'"),
            ("desired_value", "'true'"),
            ("desired_comment", "'nice'"),
            ("version", "3"),
            ("assessment_id", "'a-1'"),
            ("generation", "2"),
            ("trace_id", "'tr-1'"),
            ("state", "'dead'"),
            ("attempts", "4"),
            ("next_attempt_at", "1000"),
            ("enqueued_at", "2000"),
            ("last_error", "'boom'"),
            ("updated_at", "3000"),
            ("claims", "5"),
        ];
        let want = Delivery {
            key: key(),
            chat_id: "c1".into(),
            desired: Desired::Upsert {
                value: FeedbackValue::Bool(true),
                comment: Some("nice".into()),
            },
            version: 3,
            assessment_id: Some("a-1".into()),
            generation: 2,
            trace_id: Some("tr-1".into()),
            state: DeliveryState::Dead,
            attempts: 4,
            next_attempt_at: at(1000),
            enqueued_at: at(2000),
            last_error: Some("boom".into()),
            updated_at: at(3000),
            claims: 5,
        };
        for got in both_orders(&columns, delivery) {
            assert_eq!(got.expect("decodes"), want);
        }
    }

    #[test]
    fn a_vote_a_link_and_a_reviewed_vote_are_decoded_by_column_name() {
        let vote_columns = [
            ("message_id", "'m1'"),
            ("user_id", "'u1'"),
            ("name", "'user_feedback'"),
            ("chat_id", "'c1'"),
            ("value", "'\"meh\"'"),
            ("comment", "'so-so'"),
            ("updated_at", "3000"),
            ("expected_response", "'the 2024 numbers'"),
        ];
        let want = Vote {
            key: key(),
            chat_id: "c1".into(),
            value: FeedbackValue::String("meh".into()),
            comment: Some("so-so".into()),
            expected_response: Some("the 2024 numbers".into()),
            updated_at: at(3000),
        };
        for got in both_orders(&vote_columns, vote) {
            assert_eq!(got.expect("decodes"), want);
        }

        let mut review_columns = vote_columns.to_vec();
        review_columns.extend([
            ("route", "'/chat'"),
            ("state", "'done'"),
            ("last_error", "NULL"),
            ("trace_id", "'tr-1'"),
        ]);
        let want = ReviewedVote {
            key: key(),
            chat_id: "c1".into(),
            value: FeedbackValue::String("meh".into()),
            comment: Some("so-so".into()),
            updated_at: at(3000),
            route: Some("/chat".into()),
            delivery: Some(DeliveryState::Done),
            last_error: None,
            trace_id: Some("tr-1".into()),
            correction: Some("the 2024 numbers".into()),
        };
        for got in both_orders(&review_columns, reviewed) {
            assert_eq!(got.expect("decodes"), want);
        }

        let link_columns = [
            ("message_id", "'m1'"),
            ("chat_id", "'c1'"),
            ("user_id", "'u1'"),
            ("trace_id", "'tr-1'"),
            ("client_request_id", "'cr-1'"),
            ("open", "1"),
            ("created_at", "1000"),
            ("updated_at", "2000"),
            ("route", "'/chat'"),
        ];
        let want = MessageLink {
            message_id: "m1".into(),
            chat_id: Some("c1".into()),
            user_id: "u1".into(),
            trace_id: Some("tr-1".into()),
            client_request_id: Some("cr-1".into()),
            open: true,
            created_at: at(1000),
            updated_at: at(2000),
            route: Some("/chat".into()),
        };
        for got in both_orders(&link_columns, link) {
            assert_eq!(got, want);
        }
    }
}
