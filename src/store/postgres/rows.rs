//! Every row type the Postgres store returns, decoded by column name in exactly one function
//! each: a delivery, a vote, a message link, a reviewed vote. The order of a SELECT or
//! RETURNING list does not matter; a column that is missing or of the wrong type is
//! [`StoreError::Corrupt`], naming the row type and the column.
//!
//! A new column of one of these rows: the migration, the statements that write it, and the
//! decoder here (plus `delivery_columns!` for a delivery column).

use tokio_postgres::Row;
use tokio_postgres::types::FromSql;

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

/// Reads column `column` of a `what` row.
fn get<'a, T: FromSql<'a>>(row: &'a Row, what: &str, column: &str) -> Result<T, StoreError> {
    row.try_get(column)
        .map_err(|e| StoreError::Corrupt(format!("{what} row, column {column}: {e}")))
}

fn key(row: &Row, what: &str) -> Result<VoteKey, StoreError> {
    Ok(VoteKey {
        message_id: get(row, what, "message_id")?,
        user_id: get(row, what, "user_id")?,
        name: get(row, what, "name")?,
    })
}

/// A row selected with `delivery_columns!()`.
pub(super) fn delivery(row: &Row) -> Result<Delivery, StoreError> {
    const W: &str = "delivery";
    Ok(Delivery {
        key: key(row, W)?,
        chat_id: get(row, W, "chat_id")?,
        desired: codec::desired(
            get(row, W, "desired")?,
            get(row, W, "desired_value")?,
            get(row, W, "desired_comment")?,
        )?,
        version: get(row, W, "version")?,
        assessment_id: get(row, W, "assessment_id")?,
        generation: get(row, W, "generation")?,
        trace_id: get(row, W, "trace_id")?,
        state: codec::state(get(row, W, "state")?)?,
        attempts: get(row, W, "attempts")?,
        next_attempt_at: get(row, W, "next_attempt_at")?,
        enqueued_at: get(row, W, "enqueued_at")?,
        last_error: get(row, W, "last_error")?,
        updated_at: get(row, W, "updated_at")?,
        claims: get(row, W, "claims")?,
    })
}

/// A row whose delivery columns come from an outer join: `None` when they are NULL (nothing
/// was written), else the delivery.
pub(super) fn written_delivery(row: &Row) -> Result<Option<Delivery>, StoreError> {
    let version: Option<i64> = get(row, "delivery", "version")?;
    version.map(|_| delivery(row)).transpose()
}

/// A row of `votes` (`message_id, user_id, name, chat_id, value, comment, updated_at`).
pub(super) fn vote(row: &Row) -> Result<Vote, StoreError> {
    const W: &str = "vote";
    Ok(Vote {
        key: key(row, W)?,
        chat_id: get(row, W, "chat_id")?,
        value: codec::value_from_json(&get(row, W, "value")?)?,
        comment: get(row, W, "comment")?,
        expected_response: get(row, W, "expected_response")?,
        updated_at: get(row, W, "updated_at")?,
    })
}

/// A row of `message_links` (all its columns).
pub(super) fn link(row: &Row) -> Result<MessageLink, StoreError> {
    link_named(row, &LINK)
}

/// A row carrying a message link's columns prefixed `link_` (`link_message_id`, …) beside
/// other columns of the same names (a delivery's).
pub(super) fn prefixed_link(row: &Row) -> Result<MessageLink, StoreError> {
    link_named(row, &PREFIXED_LINK)
}

/// The names of a message link's columns in a row, in [`MessageLink`]'s field order.
type LinkNames = [&'static str; 9];

const LINK: LinkNames = [
    "message_id",
    "chat_id",
    "user_id",
    "trace_id",
    "client_request_id",
    "open",
    "created_at",
    "updated_at",
    "route",
];

const PREFIXED_LINK: LinkNames = [
    "link_message_id",
    "link_chat_id",
    "link_user_id",
    "link_trace_id",
    "link_client_request_id",
    "link_open",
    "link_created_at",
    "link_updated_at",
    "link_route",
];

fn link_named(row: &Row, n: &LinkNames) -> Result<MessageLink, StoreError> {
    const W: &str = "message link";
    Ok(MessageLink {
        message_id: get(row, W, n[0])?,
        chat_id: get(row, W, n[1])?,
        user_id: get(row, W, n[2])?,
        trace_id: get(row, W, n[3])?,
        client_request_id: get(row, W, n[4])?,
        open: get(row, W, n[5])?,
        created_at: get(row, W, n[6])?,
        updated_at: get(row, W, n[7])?,
        route: get(row, W, n[8])?,
    })
}

/// A row of the review listing: a vote's columns, its delivery's `state`, `last_error` and
/// `trace_id` (NULL without a delivery).
pub(super) fn reviewed(row: &Row) -> Result<ReviewedVote, StoreError> {
    const W: &str = "review";
    let state: Option<&str> = get(row, W, "state")?;
    Ok(ReviewedVote {
        key: key(row, W)?,
        chat_id: get(row, W, "chat_id")?,
        value: codec::value_from_json(&get(row, W, "value")?)?,
        comment: get(row, W, "comment")?,
        updated_at: get(row, W, "updated_at")?,
        route: get(row, W, "route")?,
        delivery: state.map(codec::state).transpose()?,
        last_error: get(row, W, "last_error")?,
        trace_id: get(row, W, "trace_id")?,
        correction: get(row, W, "expected_response")?,
    })
}

#[cfg(test)]
mod tests {
    //! Each decoder reads a literal row whose columns come in the usual order and reversed:
    //! both must decode to the same, expected value (a positional decoder fails the reversed
    //! one). Needs the test Postgres (`FP_TEST_PG_URL`, set up by `scripts/test.sh`); no schema.

    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::config::SslMode;
    use crate::domain::FeedbackValue;
    use crate::store::api::{DeliveryState, Desired};

    async fn client() -> tokio_postgres::Client {
        let url = std::env::var("FP_TEST_PG_URL")
            .expect("FP_TEST_PG_URL is not set: run the Postgres tests through scripts/test.sh");
        let tls = super::super::tls::Tls::new(SslMode::Prefer, None).expect("TLS connector");
        let connector = tls.connector.expect("a connector for sslmode=prefer");
        let (client, connection) = tokio_postgres::connect(&url, connector)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
        tokio::spawn(connection);
        client
    }

    /// `SELECT <literal> AS <column>, …` in the given order, then reversed; the decoded rows.
    async fn both_orders<T>(
        client: &tokio_postgres::Client,
        columns: &[(&str, &str)],
        decode: impl Fn(&Row) -> Result<T, StoreError>,
    ) -> Vec<T> {
        let select = |cols: &mut dyn Iterator<Item = &(&str, &str)>| {
            let list: Vec<String> = cols.map(|(c, lit)| format!("{lit} AS {c}")).collect();
            format!("SELECT {}", list.join(", "))
        };
        let mut out = Vec::new();
        for sql in [
            select(&mut columns.iter()),
            select(&mut columns.iter().rev()),
        ] {
            let row = client
                .query_one(&sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            out.push(decode(&row).unwrap_or_else(|e| panic!("{sql}: {e}")));
        }
        out
    }

    fn at(secs: u64) -> std::time::SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn key() -> VoteKey {
        VoteKey {
            message_id: "m1".into(),
            user_id: "u1".into(),
            name: "user_feedback".into(),
        }
    }

    #[tokio::test]
    async fn every_row_type_is_decoded_by_column_name() {
        let client = client().await;
        let delivery_columns = [
            ("message_id", "'m1'::text"),
            ("user_id", "'u1'::text"),
            ("name", "'user_feedback'::text"),
            ("chat_id", "'c1'::text"),
            ("desired", "'upsert'::text"),
            ("desired_value", "'true'::jsonb"),
            ("desired_comment", "'nice'::text"),
            ("version", "3::bigint"),
            ("assessment_id", "'a-1'::text"),
            ("generation", "2::bigint"),
            ("trace_id", "'tr-1'::text"),
            ("state", "'dead'::text"),
            ("attempts", "4::integer"),
            ("next_attempt_at", "to_timestamp(1000)"),
            ("enqueued_at", "to_timestamp(2000)"),
            ("last_error", "'boom'::text"),
            ("updated_at", "to_timestamp(3000)"),
            ("claims", "5::bigint"),
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
        for got in both_orders(&client, &delivery_columns, delivery).await {
            assert_eq!(got, want);
        }

        let vote_columns = [
            ("message_id", "'m1'::text"),
            ("user_id", "'u1'::text"),
            ("name", "'user_feedback'::text"),
            ("chat_id", "'c1'::text"),
            ("value", "'\"meh\"'::jsonb"),
            ("comment", "'so-so'::text"),
            ("updated_at", "to_timestamp(3000)"),
            ("expected_response", "'the 2024 numbers'::text"),
        ];
        let want = Vote {
            key: key(),
            chat_id: "c1".into(),
            value: FeedbackValue::String("meh".into()),
            comment: Some("so-so".into()),
            expected_response: Some("the 2024 numbers".into()),
            updated_at: at(3000),
        };
        for got in both_orders(&client, &vote_columns, vote).await {
            assert_eq!(got, want);
        }

        let mut review_columns = vote_columns.to_vec();
        review_columns.extend([
            ("route", "'/chat'::text"),
            ("state", "'done'::text"),
            ("last_error", "NULL::text"),
            ("trace_id", "'tr-1'::text"),
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
        for got in both_orders(&client, &review_columns, reviewed).await {
            assert_eq!(got, want);
        }

        let link_columns = [
            ("message_id", "'m1'::text"),
            ("chat_id", "'c1'::text"),
            ("user_id", "'u1'::text"),
            ("trace_id", "'tr-1'::text"),
            ("client_request_id", "'cr-1'::text"),
            ("open", "true"),
            ("created_at", "to_timestamp(1000)"),
            ("updated_at", "to_timestamp(2000)"),
            ("route", "'/chat'::text"),
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
        for got in both_orders(&client, &link_columns, link).await {
            assert_eq!(got, want);
        }
        let prefixed: Vec<(String, &str)> = link_columns
            .iter()
            .map(|(c, v)| (format!("link_{c}"), *v))
            .collect();
        let prefixed: Vec<(&str, &str)> = prefixed.iter().map(|(c, v)| (c.as_str(), *v)).collect();
        for got in both_orders(&client, &prefixed, prefixed_link).await {
            assert_eq!(got, want);
        }
    }
}
