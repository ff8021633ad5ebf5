//! The review surface (issue 15): the store's summary and listing queries on both backends
//! (counts equal to the votes cast, bucket edges, empty ranges, retracted and changed votes,
//! filters, keyset paging under concurrent inserts), then the HTTP surface through the running
//! proxy (who may look, the summary's arithmetic, pseudonyms, trace links, metrics) and the
//! `export` command of the real binary.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use feedback_proxy::domain::{Polarity, Thresholds};
use feedback_proxy::store::{
    Enqueue, FeedbackValue, LinkRecord, LinkedVote, ListQuery, NewVote, ReviewScope, SharedStore,
    SummaryCell, SummaryQuery, VoteKey,
};

on_both_backends!(
    summary_counts_current_votes_per_value,
    summary_bucket_edges_and_empty_ranges,
    summary_filters_by_name_and_route,
    listing_filters_by_polarity_comment_name_and_route,
    listing_pages_neither_repeat_nor_skip_under_concurrent_inserts,
    listing_shows_delivery_state_and_trace,
    summary_stays_exact_under_concurrent_votes_on_the_same_keys,
);

const HOUR: Duration = Duration::from_secs(3600);

fn link(m: &str, user: &str, route: &str) -> LinkRecord {
    LinkRecord {
        message_id: m.into(),
        chat_id: Some("chat".into()),
        user_id: user.into(),
        trace_id: None,
        client_request_id: None,
        open: false,
        route: Some(Arc::from(route)),
    }
}

/// A vote to cast: its name, value and comment.
struct V {
    name: &'static str,
    value: FeedbackValue,
    comment: Option<&'static str>,
}

fn thumbs(up: bool) -> V {
    V {
        name: "user_feedback",
        value: FeedbackValue::Bool(up),
        comment: None,
    }
}

fn rating(n: f64) -> V {
    V {
        name: "rating",
        value: FeedbackValue::Number(n),
        comment: None,
    }
}

fn word(w: &str) -> V {
    V {
        name: "user_feedback",
        value: FeedbackValue::String(w.to_owned()),
        comment: None,
    }
}

impl V {
    fn said(self, comment: &'static str) -> V {
        V {
            comment: Some(comment),
            ..self
        }
    }
}

/// Links `m` to `user` on `route` and stores the vote.
async fn cast(store: &SharedStore, m: &str, user: &str, v: V, route: &str) {
    let V {
        name,
        value,
        comment,
    } = v;
    store
        .record_links(&[link(m, user, route)])
        .await
        .expect("record link");
    store
        .upsert_vote(
            &NewVote {
                key: VoteKey {
                    message_id: m.into(),
                    user_id: user.into(),
                    name: name.into(),
                },
                chat_id: "chat".into(),
                value,
                comment: comment.map(Into::into),
            },
            &Enqueue::Pending,
        )
        .await
        .expect("upsert vote");
}

fn scope(from: SystemTime, to: SystemTime) -> ReviewScope {
    ReviewScope {
        from,
        to,
        name: None,
        route: None,
    }
}

/// The whole of today and tomorrow: every vote a test casts now.
fn around_now() -> ReviewScope {
    let now = SystemTime::now();
    scope(now - 24 * HOUR, now + 24 * HOUR)
}

async fn summary(store: &SharedStore, scope: ReviewScope, bucket_hours: u32) -> Vec<SummaryCell> {
    store
        .review_summary(&SummaryQuery {
            scope,
            bucket_hours,
        })
        .await
        .expect("summary")
}

/// (name, value as JSON text) → (votes, commented), over all buckets.
fn by_value(cells: &[SummaryCell]) -> Vec<(String, String, i64, i64)> {
    let mut out: Vec<(String, String, i64, i64)> = Vec::new();
    for c in cells {
        let v = c.value.to_json().to_string();
        match out.iter_mut().find(|(n, x, _, _)| *n == c.name && *x == v) {
            Some(e) => {
                e.2 += c.votes;
                e.3 += c.commented;
            }
            None => out.push((c.name.clone(), v, c.votes, c.commented)),
        }
    }
    out.sort();
    out
}

fn row(name: &str, value: &str, votes: i64, commented: i64) -> (String, String, i64, i64) {
    (name.into(), value.into(), votes, commented)
}

fn list(scope: ReviewScope, limit: u32) -> ListQuery {
    ListQuery {
        scope,
        polarity: None,
        has_comment: None,
        thresholds: Thresholds::default(),
        limit,
    }
}

mod suite {
    use super::*;
    use FeedbackValue::Bool;

    pub async fn summary_counts_current_votes_per_value(store: SharedStore) {
        cast(&store, "m1", "a", thumbs(true), "/invocations").await;
        cast(&store, "m2", "b", thumbs(true), "/invocations").await;
        cast(
            &store,
            "m3",
            "c",
            thumbs(false).said("wrong"),
            "/invocations",
        )
        .await;
        cast(&store, "m4", "d", rating(5.0), "/invocations").await;
        cast(&store, "m5", "e", rating(1.0).said("bad"), "/invocations").await;
        cast(&store, "m6", "f", word("thumbs_down"), "/invocations").await;
        assert_eq!(
            by_value(&summary(&store, around_now(), 1).await),
            vec![
                row("rating", "1.0", 1, 1),
                row("rating", "5.0", 1, 0),
                row("user_feedback", "\"thumbs_down\"", 1, 0),
                row("user_feedback", "false", 1, 1),
                row("user_feedback", "true", 2, 0),
            ]
        );

        // A changed vote counts once, with its last value (and its comment moves with it).
        cast(
            &store,
            "m1",
            "a",
            thumbs(false).said("changed my mind"),
            "/invocations",
        )
        .await;
        cast(&store, "m4", "d", rating(4.0), "/invocations").await;
        // A retracted vote is no longer counted.
        let gone = VoteKey {
            message_id: "m2".into(),
            user_id: "b".into(),
            name: "user_feedback".into(),
        };
        assert!(
            store
                .retract_vote(&gone, Duration::ZERO)
                .await
                .unwrap()
                .is_some()
        );
        // Re-voting the same value with another comment changes only the comment count.
        cast(&store, "m3", "c", thumbs(false), "/invocations").await;
        let cells = summary(&store, around_now(), 24).await;
        assert_eq!(
            by_value(&cells),
            vec![
                row("rating", "1.0", 1, 1),
                row("rating", "4.0", 1, 0),
                row("user_feedback", "\"thumbs_down\"", 1, 0),
                row("user_feedback", "false", 2, 1),
            ]
        );
        let total: i64 = cells.iter().map(|c| c.votes).sum();
        assert_eq!(total, 5, "five votes are current: {cells:?}");
    }

    pub async fn summary_bucket_edges_and_empty_ranges(store: SharedStore) {
        cast(&store, "m1", "a", thumbs(true), "/invocations").await;
        // The hour the vote was stored in, from the store's own clock.
        let at = store.list_votes("chat", "a").await.unwrap()[0].updated_at;
        let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let hour = SystemTime::UNIX_EPOCH + Duration::from_secs(secs / 3600 * 3600);
        let day = SystemTime::UNIX_EPOCH + Duration::from_secs(secs / 86400 * 86400);

        // The vote's own hour, however little of it is asked for (ranges round out to hours).
        let cells = summary(&store, scope(hour, hour + Duration::from_millis(1)), 1).await;
        assert_eq!(cells.len(), 1, "{cells:?}");
        assert_eq!(cells[0].bucket, hour);
        let cells = summary(
            &store,
            scope(hour + HOUR - Duration::from_millis(1), hour + HOUR),
            1,
        )
        .await;
        assert_eq!(cells.len(), 1, "{cells:?}");
        // `to` is exclusive: the hour before ends where the vote's hour starts.
        assert!(
            summary(&store, scope(hour - HOUR, hour), 1)
                .await
                .is_empty()
        );
        // The next hour, and a range with nothing in it at all.
        assert!(
            summary(&store, scope(hour + HOUR, hour + 2 * HOUR), 1)
                .await
                .is_empty()
        );
        let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(86400);
        assert!(
            summary(&store, scope(long_ago, long_ago), 24)
                .await
                .is_empty()
        );
        assert!(
            summary(&store, scope(long_ago, long_ago + HOUR), 1)
                .await
                .is_empty()
        );
        // Daily buckets start at midnight UTC.
        let cells = summary(&store, scope(day, day + 24 * HOUR), 24).await;
        assert_eq!(cells.len(), 1);
        assert_eq!(cells[0].bucket, day);
        assert_eq!(cells[0].votes, 1);
    }

    pub async fn summary_filters_by_name_and_route(store: SharedStore) {
        cast(&store, "m1", "a", thumbs(true), "/invocations").await;
        cast(&store, "m2", "a", thumbs(false), "/responses").await;
        cast(&store, "m3", "a", rating(2.0), "/responses").await;
        let mut s = around_now();
        s.route = Some("/responses".into());
        assert_eq!(
            by_value(&summary(&store, s.clone(), 1).await),
            vec![
                row("rating", "2.0", 1, 0),
                row("user_feedback", "false", 1, 0)
            ]
        );
        s.name = Some("user_feedback".into());
        assert_eq!(
            by_value(&summary(&store, s, 1).await),
            vec![row("user_feedback", "false", 1, 0)]
        );
        let mut s = around_now();
        s.route = Some("/nowhere".into());
        assert!(summary(&store, s, 1).await.is_empty());
    }

    pub async fn listing_filters_by_polarity_comment_name_and_route(store: SharedStore) {
        cast(
            &store,
            "m1",
            "a",
            thumbs(true).said("great"),
            "/invocations",
        )
        .await;
        cast(
            &store,
            "m2",
            "b",
            thumbs(false).said("wrong"),
            "/invocations",
        )
        .await;
        cast(&store, "m3", "c", word("thumbs_down"), "/responses").await;
        cast(&store, "m4", "d", rating(2.0), "/responses").await;
        cast(&store, "m5", "e", rating(3.0).said("meh"), "/responses").await;
        cast(&store, "m6", "f", rating(4.5), "/responses").await;
        let ids = |rows: Vec<feedback_proxy::store::ReviewedVote>| {
            rows.into_iter()
                .map(|r| r.key.message_id)
                .collect::<Vec<_>>()
        };
        let mut q = list(around_now(), 50);
        // Newest first.
        assert_eq!(
            ids(store.review_votes(&q, None).await.unwrap()),
            ["m6", "m5", "m4", "m3", "m2", "m1"]
        );
        q.polarity = Some(Polarity::Negative);
        assert_eq!(
            ids(store.review_votes(&q, None).await.unwrap()),
            ["m4", "m3", "m2"]
        );
        q.polarity = Some(Polarity::Positive);
        assert_eq!(
            ids(store.review_votes(&q, None).await.unwrap()),
            ["m6", "m1"]
        );
        // The thresholds are the caller's: with 3 as negative, m5 turns negative.
        q.polarity = Some(Polarity::Negative);
        q.thresholds.negative_to = 3.0;
        assert_eq!(
            ids(store.review_votes(&q, None).await.unwrap()),
            ["m5", "m4", "m3", "m2"]
        );
        q.has_comment = Some(true);
        assert_eq!(
            ids(store.review_votes(&q, None).await.unwrap()),
            ["m5", "m2"]
        );
        q.has_comment = Some(false);
        q.scope.route = Some("/responses".into());
        assert_eq!(
            ids(store.review_votes(&q, None).await.unwrap()),
            ["m4", "m3"]
        );
        q.scope.name = Some("rating".into());
        assert_eq!(ids(store.review_votes(&q, None).await.unwrap()), ["m4"]);
        // A range that ends before the votes.
        let q = list(scope(SystemTime::UNIX_EPOCH, SystemTime::now() - HOUR), 50);
        assert!(store.review_votes(&q, None).await.unwrap().is_empty());
        // A retracted vote is gone from the listing.
        let gone = VoteKey {
            message_id: "m1".into(),
            user_id: "a".into(),
            name: "user_feedback".into(),
        };
        store.retract_vote(&gone, Duration::ZERO).await.unwrap();
        let all = store
            .review_votes(&list(around_now(), 50), None)
            .await
            .unwrap();
        assert_eq!(ids(all), ["m6", "m5", "m4", "m3", "m2"]);
    }

    pub async fn listing_pages_neither_repeat_nor_skip_under_concurrent_inserts(
        store: SharedStore,
    ) {
        for i in 0..40 {
            cast(
                &store,
                &format!("m{i:02}"),
                &format!("u{}", i % 7),
                thumbs(i % 3 != 0),
                "/invocations",
            )
            .await;
        }
        let before: HashSet<String> = (0..40).map(|i| format!("m{i:02}")).collect();
        // The walk's range ends just after the newest of those votes (as the store's clock wrote
        // it, in its precision), and the concurrent votes start only once the clock has passed
        // that end, so that they are newer than the walk's range whatever the clock's grain.
        let newest = store
            .review_votes(&list(around_now(), 1), None)
            .await
            .unwrap()[0]
            .updated_at;
        let end = newest + Duration::from_millis(1);
        let walk = scope(SystemTime::UNIX_EPOCH, end);
        while SystemTime::now() <= end + Duration::from_millis(1) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Votes keep arriving while the walk pages (they are newer than its range).
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..40 {
                    cast(
                        &store,
                        &format!("new{i:02}"),
                        "w",
                        thumbs(false),
                        "/invocations",
                    )
                    .await;
                }
            })
        };
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let rows = store
                .review_votes(&list(walk.clone(), 3), after.as_ref())
                .await
                .unwrap();
            pages += 1;
            let Some(last) = rows.last() else { break };
            after = Some(last.cursor());
            // The cursor survives its text form, as a client would send it back.
            after = feedback_proxy::store::ReviewCursor::decode(&after.unwrap().encode());
            seen.extend(rows.iter().map(|r| r.key.message_id.clone()));
            assert!(pages < 100, "the walk does not end");
        }
        writer.await.unwrap();
        let unique: HashSet<String> = seen.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            seen.len(),
            "a vote was listed twice: {seen:?}"
        );
        assert_eq!(
            unique, before,
            "the walk must list exactly the votes cast before it"
        );
        assert!(pages >= 40 / 3, "pages of 3: {pages}");
    }

    /// The rollup is kept in the same transaction as every vote change (the triggers on
    /// `votes`): under concurrent first votes, re-votes, flips, comment changes and retractions
    /// of the SAME few keys, through every write path the proxy uses (`vote_on_link` with the
    /// general path as its fallback, as `POST /api/feedback` does, `upsert_vote`,
    /// `retract_vote`), the summary must still equal a count of the votes that are current at
    /// the end.
    pub async fn summary_stays_exact_under_concurrent_votes_on_the_same_keys(store: SharedStore) {
        const MESSAGES: usize = 6;
        const TASKS: usize = 8;
        const OPS: usize = 60;
        let links: Vec<LinkRecord> = (0..MESSAGES)
            .map(|i| link(&format!("m{i}"), &format!("u{}", i % 3), "/invocations"))
            .collect();
        store.record_links(&links).await.expect("record links");
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    // Each task's own deterministic sequence (no shared RNG state).
                    let mut rng = fastrand::Rng::with_seed(t as u64);
                    let mut fallbacks = 0;
                    for _ in 0..OPS {
                        let i = rng.usize(..MESSAGES);
                        let name = if rng.bool() {
                            "user_feedback"
                        } else {
                            "rating"
                        };
                        let key = VoteKey {
                            message_id: format!("m{i}"),
                            user_id: format!("u{}", i % 3),
                            name: name.into(),
                        };
                        let value = if name == "rating" {
                            FeedbackValue::Number(f64::from(rng.u8(1..=3)))
                        } else {
                            FeedbackValue::Bool(rng.bool())
                        };
                        let comment = rng.bool().then(|| "said".to_owned());
                        // The general path's write of this vote.
                        let general = |key, value, comment| {
                            let store = store.clone();
                            async move {
                                let vote = NewVote {
                                    key,
                                    chat_id: "chat".into(),
                                    value,
                                    comment,
                                };
                                store
                                    .upsert_vote(&vote, &Enqueue::Pending)
                                    .await
                                    .expect("upsert vote");
                            }
                        };
                        match rng.u8(..5) {
                            0 => {
                                store
                                    .retract_vote(&key, Duration::ZERO)
                                    .await
                                    .expect("retract");
                            }
                            1 => general(key, value, comment).await,
                            _ => {
                                let offer = LinkedVote {
                                    key: key.clone(),
                                    chat_id: None,
                                    value: value.clone(),
                                    comment: comment.clone(),
                                };
                                let w = store
                                    .vote_on_link(&offer, &Enqueue::Pending, false, None)
                                    .await
                                    .expect("vote on link");
                                assert!(w.link.is_some(), "the message is linked");
                                if w.written.is_none() {
                                    // Declined (SQLite's default writes nothing): the
                                    // general path, as the feedback handler takes it.
                                    fallbacks += 1;
                                    general(key, value, comment).await;
                                }
                            }
                        }
                    }
                    fallbacks
                })
            })
            .collect();
        let mut fallbacks = 0;
        for t in tasks {
            fallbacks += t.await.expect("task");
        }
        eprintln!("vote_on_link writes that took the general path: {fallbacks}");

        // The current votes, from `votes` itself (the listing), counted like the summary.
        let mut current: Vec<(String, String, i64, i64)> = Vec::new();
        let mut after = None;
        loop {
            let rows = store
                .review_votes(&list(around_now(), 50), after.as_ref())
                .await
                .expect("listing");
            let Some(last) = rows.last() else { break };
            after = Some(last.cursor());
            for r in &rows {
                let v = r.value.to_json().to_string();
                let c = i64::from(r.comment.is_some());
                match current
                    .iter_mut()
                    .find(|(n, x, _, _)| *n == r.key.name && *x == v)
                {
                    Some(e) => {
                        e.2 += 1;
                        e.3 += c;
                    }
                    None => current.push((r.key.name.clone(), v, 1, c)),
                }
            }
        }
        current.sort();
        assert!(!current.is_empty(), "some votes are current");
        assert_eq!(
            by_value(&summary(&store, around_now(), 1).await),
            current,
            "the rollup's counts against the current votes"
        );
    }

    pub async fn listing_shows_delivery_state_and_trace(store: SharedStore) {
        let mut l = link("m1", "a", "/invocations");
        l.trace_id = Some("tr-0123456789abcdef0123456789abcdef".into());
        store.record_links(&[l]).await.unwrap();
        store
            .upsert_vote(
                &NewVote {
                    key: VoteKey {
                        message_id: "m1".into(),
                        user_id: "a".into(),
                        name: "user_feedback".into(),
                    },
                    chat_id: "chat".into(),
                    value: Bool(false),
                    comment: Some("no".into()),
                },
                &Enqueue::Waiting {
                    reason: "no_experiment_id".into(),
                },
            )
            .await
            .unwrap();
        let rows = store
            .review_votes(&list(around_now(), 10), None)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            r.trace_id.as_deref(),
            Some("tr-0123456789abcdef0123456789abcdef")
        );
        assert_eq!(
            r.delivery,
            Some(feedback_proxy::store::DeliveryState::Waiting)
        );
        assert_eq!(r.last_error.as_deref(), Some("no_experiment_id"));
        assert_eq!(r.route.as_deref(), Some("/invocations"));
        assert_eq!(r.comment.as_deref(), Some("no"));
        assert_eq!(r.chat_id, "chat");
        assert_eq!(r.value, Bool(false));
        let backlog = store.review_backlog().await.unwrap();
        assert_eq!((backlog.pending, backlog.waiting, backlog.dead), (0, 1, 0));
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP surface, through the running proxy (SQLite store in its temporary directory), with
// an agent that replays the capture `91_*` (trace id in a response header).

mod http_surface {
    use bytes::Bytes;
    use http::Request;
    use serde_json::{Value, json};

    use super::support;
    use support::proxy::{TestProxy, h1, send};
    use support::upstream::Upstream;

    pub const OWNER: &str = "owner@example.com";
    pub const ALICE: &str = "alice@example.com";
    pub const BOB: &str = "bob@example.com";
    pub const TRACE: &str = "tr-eaf19740d012e3a3e64accc2bf6d17bc";

    pub async fn replaying_agent() -> Upstream {
        let body = Bytes::from(
            std::fs::read(format!(
                "{}/tests/fixtures/samples/91_agent_stream_return_trace_header.sse.txt",
                env!("CARGO_MANIFEST_DIR")
            ))
            .expect("capture 91"),
        );
        Upstream::start(move |_req| {
            let body = body.clone();
            async move { support::upstream::full(200, "text/event-stream; charset=utf-8", body) }
        })
        .await
    }

    pub fn config(agent: &str, review: &str) -> String {
        format!(
            "[identity]\ntrust_forwarded_headers = true\n[agent]\nurl = \"{agent}\"\n\
             [review]\ntrace_url = \"https://mlflow.example/#/experiments/{{experiment_id}}/traces?selectedEvaluationId={{trace_id}}\"\n{review}"
        )
    }

    /// Streams one answer to `user` and returns its message id, once its link is closed.
    pub async fn chat(proxy: &TestProxy, user: &str) -> String {
        let res = send(
            &h1(),
            Request::post(proxy.url("/invocations"))
                .header("content-type", "application/json")
                .header("x-forwarded-email", user)
                .header("x-chat-id", "c1"),
            "{}",
        )
        .await;
        assert_eq!(res.status(), 200);
        let m = res.headers()["x-message-id"].to_str().unwrap().to_owned();
        support::proxy::body_bytes(res).await;
        support::proxy::closed_link(proxy, &m).await;
        m
    }

    pub async fn vote(proxy: &TestProxy, user: &str, m: &str, body: Value) {
        let mut body = body;
        body["chatId"] = json!("c1");
        body["messageId"] = json!(m);
        let (status, answer) = support::proxy::post_vote(proxy, user, &body).await;
        assert_eq!(status, 200, "{answer}");
    }

    async fn get(proxy: &TestProxy, path: &str, user: Option<&str>) -> (u16, Value) {
        let mut req = Request::get(proxy.url(path));
        if let Some(u) = user {
            req = req.header("x-forwarded-email", u);
        }
        let res = send(&h1(), req, "").await;
        let status = res.status().as_u16();
        if let Some(cc) = res.headers().get("cache-control") {
            assert_eq!(cc, "no-store");
        }
        let bytes = support::proxy::body_bytes(res).await;
        (
            status,
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into())),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_surface_is_off_without_reviewers_and_only_for_reviewers_with_them() {
        let agent = replaying_agent().await;
        let off = TestProxy::start(&config(&agent.url(), "")).await;
        for path in ["/api/review/summary", "/api/review/feedback", "/review"] {
            let (status, body) = get(&off, path, Some(OWNER)).await;
            assert_eq!(status, 404, "{path}: {body}");
        }
        off.shutdown().await;

        let on = TestProxy::start(&config(&agent.url(), "users = [\"Owner@Example.com\"]\n")).await;
        for path in ["/api/review/summary", "/api/review/feedback", "/review"] {
            let (status, body) = get(&on, path, Some(ALICE)).await;
            assert_eq!(status, 403, "{path}: {body}");
            assert_eq!(body["code"], "FORBIDDEN");
            let (status, _) = get(&on, path, None).await;
            assert_eq!(status, 401, "{path} without an identity");
            // Reviewers are matched without regard to case.
            let (status, body) = get(&on, path, Some(OWNER)).await;
            assert_eq!(status, 200, "{path}: {body}");
        }
        let res = send(
            &h1(),
            Request::post(on.url("/api/review/summary")).header("x-forwarded-email", OWNER),
            "",
        )
        .await;
        assert_eq!(res.status(), 405);
        let (status, body) = get(&on, "/api/review/feedback?value=bad", Some(OWNER)).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("INVALID_PARAMETER"))
        );
        let (_, page) = get(&on, "/review", Some(OWNER)).await;
        assert!(
            page.as_str()
                .is_some_and(|p| p.contains("<title>Feedback review</title>"))
        );
        on.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn summary_listing_and_metrics_show_the_votes_cast() {
        let agent = replaying_agent().await;
        let proxy =
            TestProxy::start(&config(&agent.url(), "users = [\"owner@example.com\"]\n")).await;
        let (m1, m2, m3) = (
            chat(&proxy, ALICE).await,
            chat(&proxy, BOB).await,
            chat(&proxy, ALICE).await,
        );
        vote(&proxy, ALICE, &m1, json!({"isUpvoted": true})).await;
        vote(
            &proxy,
            BOB,
            &m2,
            json!({"isUpvoted": false, "comment": "it made up a table"}),
        )
        .await;
        vote(&proxy, ALICE, &m3, json!({"name": "rating", "value": 2})).await;
        vote(&proxy, BOB, &m2, json!({"name": "rating", "value": 5})).await;
        // Alice changes her mind: counted once, as a thumbs-down.
        vote(&proxy, ALICE, &m1, json!({"isUpvoted": false})).await;

        let (status, s) = get(&proxy, "/api/review/summary?bucket=hour", Some(OWNER)).await;
        assert_eq!(status, 200, "{s}");
        let t = &s["total"];
        assert_eq!(t["votes"], 4, "{s}");
        assert_eq!(
            (t["up"].as_i64(), t["down"].as_i64()),
            (Some(1), Some(3)),
            "{s}"
        );
        assert_eq!(t["negativeRate"], 0.75);
        assert_eq!(t["withComment"], 1);
        assert_eq!(t["names"]["user_feedback"]["votes"], 2);
        assert_eq!(t["names"]["rating"]["mean"], 3.5);
        assert_eq!(
            t["names"]["rating"]["distribution"],
            json!([{"value": 2.0, "votes": 1}, {"value": 5.0, "votes": 1}])
        );
        let buckets = s["buckets"].as_array().unwrap();
        // A week of hours, empty ones included, rounded out to whole hours at both ends.
        assert!(
            (24 * 7..=24 * 7 + 1).contains(&buckets.len()),
            "{} buckets",
            buckets.len()
        );
        assert_eq!(
            buckets
                .iter()
                .map(|b| b["votes"].as_i64().unwrap())
                .sum::<i64>(),
            4
        );
        assert!(s["delivery"]["waiting"].as_u64().is_some());

        let (status, page) = get(&proxy, "/api/review/feedback?value=negative", Some(OWNER)).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert_eq!(items.len(), 3, "{page}");
        let bobs = items
            .iter()
            .find(|i| i["user"] == BOB && i["name"] == "user_feedback")
            .unwrap();
        assert_eq!(bobs["comment"], "it made up a table");
        assert_eq!(bobs["traceId"], TRACE);
        assert_eq!(bobs["route"], "/invocations");
        assert_eq!(
            bobs["traceUrl"],
            format!("https://mlflow.example/#/experiments//traces?selectedEvaluationId={TRACE}")
        );
        let (_, page) = get(
            &proxy,
            "/api/review/feedback?has_comment=true&limit=1",
            Some(OWNER),
        )
        .await;
        assert_eq!(page["items"].as_array().unwrap().len(), 1);
        assert!(
            page["nextCursor"].is_null(),
            "one vote has a comment: {page}"
        );
        let (_, first) = get(&proxy, "/api/review/feedback?limit=2", Some(OWNER)).await;
        let cursor = first["nextCursor"]
            .as_str()
            .expect("a second page")
            .to_owned();
        let (_, second) = get(
            &proxy,
            &format!("/api/review/feedback?limit=2&cursor={cursor}"),
            Some(OWNER),
        )
        .await;
        assert_eq!(second["items"].as_array().unwrap().len(), 2);
        assert!(second["nextCursor"].is_null());

        let text = proxy.state.metrics.encode();
        for line in [
            "feedback_proxy_votes_accepted_total{name=\"user_feedback\",value=\"true\"} 1",
            "feedback_proxy_votes_accepted_total{name=\"user_feedback\",value=\"false\"} 2",
            "feedback_proxy_votes_accepted_total{name=\"rating\",value=\"2\"} 1",
            "feedback_proxy_votes_accepted_total{name=\"rating\",value=\"5\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        proxy.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn pseudonyms_hide_emails_and_stay_stable() {
        let agent = replaying_agent().await;
        let review = "users = [\"owner@example.com\"]\npseudonymize_users = true\npseudonym_key = \"0123456789abcdef-test\"\n";
        let proxy = TestProxy::start(&config(&agent.url(), review)).await;
        let m = chat(&proxy, ALICE).await;
        vote(
            &proxy,
            ALICE,
            &m,
            json!({"isUpvoted": false, "comment": "no"}),
        )
        .await;
        let (_, page) = get(&proxy, "/api/review/feedback", Some(OWNER)).await;
        let shown = page["items"][0]["user"].as_str().unwrap().to_owned();
        assert!(shown.starts_with("user-") && shown.len() == 17, "{shown}");
        assert!(!page.to_string().contains("alice"), "{page}");
        proxy.shutdown().await;
        // The same key gives the same pseudonym in another process (here: another proxy).
        let again = TestProxy::start(&config(&agent.url(), review)).await;
        assert_eq!(again.state.review.user_label(ALICE), shown);
        again.shutdown().await;
    }
}

mod export_command {
    use serde_json::{Value, json};

    use super::http_surface::*;
    use super::support::proxy::TestProxy;

    fn run(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_feedback-proxy"))
            .arg("export")
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("PGHOST")
            .output()
            .expect("run feedback-proxy export");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn export_writes_the_listing_as_json_lines_and_csv() {
        let agent = replaying_agent().await;
        let proxy = TestProxy::start(&config(&agent.url(), "")).await;
        let (m1, m2) = (chat(&proxy, ALICE).await, chat(&proxy, BOB).await);
        vote(&proxy, ALICE, &m1, json!({"isUpvoted": true})).await;
        vote(
            &proxy,
            BOB,
            &m2,
            json!({"isUpvoted": false, "comment": "wrong, \"very\"\nwrong"}),
        )
        .await;
        let file = proxy.dir.path().join("export.toml");
        std::fs::write(
            &file,
            format!(
                "[agent]\nurl = \"{}\"\n[store]\nurl = \"sqlite://{}/fp.db\"\nmigrate = false\n",
                agent.url(),
                proxy.dir.path().display()
            ),
        )
        .unwrap();

        let (ok, stdout, stderr) = run(&file, &[]);
        assert!(ok, "{stderr}");
        let lines: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{stdout}");
        assert_eq!(lines[0]["user"], BOB, "newest first");
        assert_eq!(lines[0]["comment"], "wrong, \"very\"\nwrong");
        assert_eq!(lines[1]["value"], true);
        assert!(stderr.contains("exported 2 votes"), "{stderr}");

        let out = proxy.dir.path().join("negative.csv");
        let (ok, _, stderr) = run(
            &file,
            &[
                "--value",
                "negative",
                "--format",
                "csv",
                "-o",
                out.to_str().unwrap(),
            ],
        );
        assert!(ok, "{stderr}");
        let mut csv = csv::Reader::from_path(&out).unwrap();
        let header: Vec<String> = csv.headers().unwrap().iter().map(str::to_owned).collect();
        assert_eq!(header, feedback_proxy::review::export::CSV_COLUMNS);
        let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(&rows[0][1], BOB);
        assert_eq!(&rows[0][7], "wrong, \"very\"\nwrong");

        let (ok, _, stderr) = run(&file, &["--value", "sideways"]);
        assert!(!ok);
        assert!(
            stderr.contains("value: expected \"negative\", \"positive\" or \"all\""),
            "{stderr}"
        );
        proxy.shutdown().await;
    }
}
