//! The store conformance suite: every `Store` operation, written once against `SharedStore`
//! and run unchanged on both backends (a fresh SQLite file / a fresh Postgres database per
//! test), plus the concurrency guarantees of the contract on both backends.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use feedback_proxy::store::DeliveryCursor;
use feedback_proxy::store::{
    AssessmentFact, Claim, CorrectionChange, DeliveryState, Desired, Enqueue, FeedbackValue,
    Finished, LinkRecord, LinkedVote, LinkedVoteWrite, NewVote, Outcome, SharedStore, StoreError,
    Ticket, VoteKey,
};

on_both_backends!(
    health_kind_and_pool,
    claim_message_reports_owner,
    record_links_merges_and_never_redirects,
    record_links_applies_a_batch_in_order,
    set_link_trace_id_only_fills_a_gap,
    upsert_vote_stores_vote_and_pending_delivery,
    upsert_vote_bumps_version_and_keeps_assessment,
    values_round_trip,
    waiting_delivery_is_woken_by_a_trace_id,
    waiting_delivery_is_woken_by_a_client_request_id,
    link_without_ids_does_not_wake,
    waiting_vote_after_the_wake_is_pending,
    held_deliveries_are_not_woken_by_links,
    retract_vote_enqueues_a_deletion,
    inline_enqueues_are_held_from_the_worker,
    list_votes_filters_and_orders,
    claim_due_leases_due_work_oldest_first,
    expired_lease_can_be_claimed_again,
    an_attempt_that_outlived_its_lease_cannot_finish_over_the_next_claim,
    claim_one_checks_version_state_and_lease,
    finish_applies_each_outcome,
    finish_with_stale_version_records_fact_only,
    finish_gone_bumps_generation,
    upsert_keeps_the_lease,
    list_deliveries_newest_first,
    list_deliveries_pages_neither_repeat_nor_skip,
    dead_reasons_count_by_reason,
    renew_lease_extends_only_the_holding_claim,
    requeue_resets_dead_and_waiting,
    requeue_held_releases_only_that_reason,
    delivery_stats_count_states,
    fifty_concurrent_upserts_leave_one_vote_and_one_delivery,
    concurrent_claimers_never_share_a_delivery,
    concurrent_stale_finish_never_marks_newer_vote_done,
    waiting_votes_racing_links_are_never_stranded,
    racing_owners_leave_one_owner_for_good,
    links_wake_only_their_owners_deliveries,
    vote_on_link_writes_only_a_vote_every_check_allows,
);

mod suite {
    use super::*;

    pub fn key(m: &str) -> VoteKey {
        VoteKey {
            message_id: m.to_owned(),
            user_id: "alice@example.com".to_owned(),
            name: "user_feedback".to_owned(),
        }
    }

    pub fn vote(m: &str, value: FeedbackValue) -> NewVote {
        NewVote {
            key: key(m),
            chat_id: "chat-1".to_owned(),
            value,
            comment: None,
        }
    }

    pub fn link(m: &str, user: &str) -> LinkRecord {
        LinkRecord {
            message_id: m.to_owned(),
            chat_id: Some("chat-1".to_owned()),
            user_id: user.to_owned(),
            trace_id: None,
            client_request_id: None,
            open: true,
            route: None,
        }
    }

    fn waiting() -> Enqueue {
        Enqueue::Waiting {
            reason: "no_trace_id".to_owned(),
        }
    }

    const LEASE: Duration = Duration::from_secs(60);

    /// Polls `claim_due` until it hands out a delivery (at most 10 s; panics with `what`).
    async fn next_due(store: &SharedStore, what: &str) -> feedback_proxy::store::Delivery {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(d) = store.claim_due(10, LEASE).await.unwrap().pop() {
                    return d;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}"))
    }

    async fn delivery_of(store: &SharedStore, k: &VoteKey) -> feedback_proxy::store::Delivery {
        store
            .list_deliveries(None, 1000)
            .await
            .unwrap()
            .into_iter()
            .find(|d| &d.key == k)
            .unwrap_or_else(|| panic!("no delivery for {k}"))
    }

    pub async fn health_kind_and_pool(store: SharedStore) {
        store.health().await.unwrap();
        assert!(["sqlite", "postgres"].contains(&store.kind()));
        let p = store.pool_status();
        assert!(p.size >= 1, "{p:?}");
        assert!(p.available <= p.size, "{p:?}");
    }

    pub async fn claim_message_reports_owner(store: SharedStore) {
        let mut l = link("m1", "alice");
        l.trace_id = Some("tr-1".into());
        assert_eq!(store.claim_message(&l).await.unwrap(), Claim::Created);
        let got = store.get_link("m1").await.unwrap().unwrap();
        assert!(got.open);
        assert_eq!(got.user_id, "alice");
        assert_eq!(got.trace_id.as_deref(), Some("tr-1"));
        assert_eq!(got.chat_id.as_deref(), Some("chat-1"));

        // Closed by the end of the stream, then claimed again by its owner: open again.
        let mut closed = link("m1", "alice");
        closed.open = false;
        store.record_links(&[closed]).await.unwrap();
        assert!(!store.get_link("m1").await.unwrap().unwrap().open);
        assert_eq!(
            store.claim_message(&link("m1", "alice")).await.unwrap(),
            Claim::Owned
        );
        assert!(store.get_link("m1").await.unwrap().unwrap().open);

        assert_eq!(
            store.claim_message(&link("m1", "mallory")).await.unwrap(),
            Claim::OtherUser
        );
        let after = store.get_link("m1").await.unwrap().unwrap();
        assert_eq!(after.user_id, "alice");
        assert_eq!(after.trace_id.as_deref(), Some("tr-1"));
    }

    pub async fn record_links_merges_and_never_redirects(store: SharedStore) {
        assert_eq!(store.get_link("nope").await.unwrap(), None);
        let mut first = link("m1", "alice");
        first.client_request_id = Some("req-1".into());
        store.record_links(&[first]).await.unwrap();
        let created = store.get_link("m1").await.unwrap().unwrap();
        assert!(created.open);
        assert_eq!(created.trace_id, None);

        // None keeps, Some replaces, open takes the new value.
        let merge = LinkRecord {
            message_id: "m1".into(),
            chat_id: None,
            user_id: "alice".into(),
            trace_id: Some("tr-1".into()),
            client_request_id: None,
            open: false,
            route: None,
        };
        store.record_links(&[merge]).await.unwrap();
        let merged = store.get_link("m1").await.unwrap().unwrap();
        assert_eq!(merged.chat_id.as_deref(), Some("chat-1"));
        assert_eq!(merged.trace_id.as_deref(), Some("tr-1"));
        assert_eq!(merged.client_request_id.as_deref(), Some("req-1"));
        assert!(!merged.open);
        assert_eq!(merged.created_at, created.created_at);
        assert!(merged.updated_at >= created.updated_at);

        // Another user's write is ignored entirely.
        let hijack = LinkRecord {
            message_id: "m1".into(),
            chat_id: Some("evil".into()),
            user_id: "mallory".into(),
            trace_id: Some("tr-evil".into()),
            client_request_id: Some("req-evil".into()),
            open: true,
            route: None,
        };
        store.record_links(&[hijack]).await.unwrap();
        assert_eq!(store.get_link("m1").await.unwrap().unwrap(), merged);
        store.record_links(&[]).await.unwrap();
    }

    pub async fn record_links_applies_a_batch_in_order(store: SharedStore) {
        let mut a_open = link("m1", "alice");
        a_open.chat_id = None;
        let b = link("m1", "bob");
        let mut a_trace = link("m1", "alice");
        a_trace.trace_id = Some("tr-1".into());
        a_trace.open = false;
        let mut a_after = link("m1", "alice");
        a_after.chat_id = Some("chat-2".into());
        a_after.open = false;
        let other = link("m2", "bob");
        store
            .record_links(&[a_open, b, a_trace, other, a_after])
            .await
            .unwrap();
        let m1 = store.get_link("m1").await.unwrap().unwrap();
        assert_eq!(m1.user_id, "alice", "the first writer owns a new message");
        assert_eq!(m1.trace_id.as_deref(), Some("tr-1"));
        assert_eq!(m1.chat_id.as_deref(), Some("chat-2"));
        assert!(!m1.open);
        assert_eq!(store.get_link("m2").await.unwrap().unwrap().user_id, "bob");
    }

    pub async fn set_link_trace_id_only_fills_a_gap(store: SharedStore) {
        let mut l = link("m1", "alice");
        l.client_request_id = Some("req-1".into());
        store.record_links(&[l]).await.unwrap();
        store.set_link_trace_id("m1", "tr-found").await.unwrap();
        assert_eq!(
            store
                .get_link("m1")
                .await
                .unwrap()
                .unwrap()
                .trace_id
                .as_deref(),
            Some("tr-found")
        );
        store.set_link_trace_id("m1", "tr-other").await.unwrap();
        assert_eq!(
            store
                .get_link("m1")
                .await
                .unwrap()
                .unwrap()
                .trace_id
                .as_deref(),
            Some("tr-found")
        );
        store.set_link_trace_id("missing", "tr-x").await.unwrap();
        assert_eq!(store.get_link("missing").await.unwrap(), None);
    }

    pub async fn upsert_vote_stores_vote_and_pending_delivery(store: SharedStore) {
        let before = SystemTime::now() - Duration::from_secs(5);
        let mut v = vote("m1", FeedbackValue::Bool(true));
        v.comment = Some("spot on".into());
        let d = store.upsert_vote(&v, &Enqueue::Pending).await.unwrap();
        assert_eq!(d.key, key("m1"));
        assert_eq!(d.chat_id, "chat-1");
        assert_eq!(
            d.desired,
            Desired::Upsert {
                value: FeedbackValue::Bool(true),
                comment: Some("spot on".into())
            }
        );
        assert_eq!(d.version, 1);
        assert_eq!(d.state, DeliveryState::Pending);
        assert_eq!(d.attempts, 0);
        assert_eq!((d.assessment_id.clone(), d.trace_id.clone()), (None, None));
        assert_eq!(d.generation, 0);
        assert_eq!(d.last_error, None);
        assert!(d.next_attempt_at >= before && d.enqueued_at >= before);
        assert_eq!(delivery_of(&store, &key("m1")).await, d);

        let votes = store
            .list_votes("chat-1", "alice@example.com")
            .await
            .unwrap();
        assert_eq!(votes.len(), 1);
        assert_eq!(votes[0].key, key("m1"));
        assert_eq!(votes[0].value, FeedbackValue::Bool(true));
        assert_eq!(votes[0].comment.as_deref(), Some("spot on"));
        assert!(votes[0].updated_at >= before);
    }

    /// `vote_on_link`: one call that reads the link and writes the vote only when the general
    /// path's checks all pass. Postgres writes in that one statement; SQLite takes the default
    /// (reads the link, writes nothing) and leaves the write to `upsert_vote_corrected`.
    pub async fn vote_on_link_writes_only_a_vote_every_check_allows(store: SharedStore) {
        let writes = store.kind() == "postgres";
        let alice = "alice@example.com";
        let inline = Enqueue::Inline {
            hold: Duration::from_secs(60),
        };
        let offer = |m: &str, chat: Option<&str>| LinkedVote {
            key: key(m),
            chat_id: chat.map(str::to_owned),
            value: FeedbackValue::Bool(false),
            comment: Some("wrong year".into()),
        };
        let nothing = LinkedVoteWrite {
            link: None,
            written: None,
            claimed: false,
        };
        assert_eq!(
            store
                .vote_on_link(&offer("unknown", None), &inline, true, Some(LEASE))
                .await
                .unwrap(),
            nothing
        );

        let mut mine = link("mine", alice);
        mine.trace_id = Some("tr-1".into());
        mine.open = false;
        let mut theirs = link("theirs", "bob@example.com");
        theirs.trace_id = Some("tr-2".into());
        let mut untraced = link("untraced", alice);
        untraced.open = false;
        let mut chatless = link("chatless", alice);
        chatless.chat_id = None;
        store
            .record_links(&[mine, theirs, untraced, chatless])
            .await
            .unwrap();

        let wait_for_trace = Enqueue::Waiting {
            reason: "no_trace_id".into(),
        };
        for (what, offered, enqueue, needs_trace) in [
            (
                "another user's message",
                offer("theirs", None),
                &inline,
                true,
            ),
            ("another chat", offer("mine", Some("chat-2")), &inline, true),
            ("no chat anywhere", offer("chatless", None), &inline, true),
            ("no trace yet", offer("untraced", None), &inline, true),
            (
                "a wait for the trace",
                offer("mine", None),
                &wait_for_trace,
                false,
            ),
        ] {
            let r = store
                .vote_on_link(&offered, enqueue, needs_trace, Some(LEASE))
                .await
                .unwrap();
            assert_eq!(r.written, None, "{what}");
            let link = store.get_link(&offered.key.message_id).await.unwrap();
            assert!(link.is_some(), "{what}");
            assert_eq!(r.link, link, "{what}");
        }
        assert_eq!(store.list_deliveries(None, 100).await.unwrap(), vec![]);
        assert_eq!(store.list_votes("chat-1", alice).await.unwrap(), vec![]);

        let r = store
            .vote_on_link(&offer("mine", None), &inline, true, None)
            .await
            .unwrap();
        assert_eq!(r.link, store.get_link("mine").await.unwrap());
        assert!(!r.claimed);
        if !writes {
            assert_eq!(r.written, None);
            assert_eq!(store.list_deliveries(None, 100).await.unwrap(), vec![]);
            return;
        }
        let d = r.written.expect("the vote is written");
        assert_eq!(d, delivery_of(&store, &key("mine")).await);
        assert_eq!(
            (d.version, d.state, d.chat_id.as_str()),
            (1, DeliveryState::Pending, "chat-1")
        );
        assert_eq!(
            d.desired,
            Desired::Upsert {
                value: FeedbackValue::Bool(false),
                comment: Some("wrong year".into())
            }
        );
        // The link's trace, which the attempt would have looked up.
        assert_eq!(d.trace_id.as_deref(), Some("tr-1"));
        assert_eq!((d.attempts, d.claims), (0, 0), "not claimed");
        // Held from the worker like any inline enqueue.
        assert!(store.claim_due(10, LEASE).await.unwrap().is_empty());

        // A re-vote keeps the correction an earlier vote carried, and bumps the version.
        store
            .upsert_vote_corrected(
                &vote("mine", FeedbackValue::Bool(false)),
                &CorrectionChange::Set("the 2024 numbers".into()),
                &inline,
            )
            .await
            .unwrap();
        let mut up = offer("mine", Some("chat-1"));
        up.value = FeedbackValue::Bool(true);
        up.comment = None;
        let d = store
            .vote_on_link(&up, &inline, true, None)
            .await
            .unwrap()
            .written
            .expect("the re-vote is written");
        assert_eq!(d.version, 3);
        let votes = store.list_votes("chat-1", alice).await.unwrap();
        assert_eq!(votes.len(), 1);
        assert_eq!(votes[0].value, FeedbackValue::Bool(true));
        assert_eq!(votes[0].comment, None);
        assert_eq!(
            votes[0].expected_response.as_deref(),
            Some("the 2024 numbers")
        );

        // Without MLflow a vote needs no trace: parked for MLflow, whatever the link holds.
        let parked = Enqueue::Waiting {
            reason: "no_experiment_id".into(),
        };
        let d = store
            .vote_on_link(&offer("untraced", None), &parked, false, Some(LEASE))
            .await
            .unwrap();
        assert!(!d.claimed, "a waiting delivery is never claimed");
        let d = d.written.expect("the untraced vote is written");
        assert_eq!(d.state, DeliveryState::Waiting);
        assert_eq!(d.last_error.as_deref(), Some("no_experiment_id"));
        assert_eq!((d.attempts, d.claims, d.trace_id.as_deref()), (0, 0, None));
        assert_eq!(d, delivery_of(&store, &key("untraced")).await);

        // With a lease: claimed for the caller, as `claim` would, and nobody else can claim it.
        let mut fresh = link("claimed", alice);
        fresh.trace_id = Some("tr-3".into());
        store.record_links(&[fresh]).await.unwrap();
        let r = store
            .vote_on_link(&offer("claimed", None), &inline, true, Some(LEASE))
            .await
            .unwrap();
        assert!(r.claimed);
        let first = r.written.expect("written");
        assert_eq!((first.version, first.attempts, first.claims), (1, 1, 1));
        assert_eq!(first.trace_id.as_deref(), Some("tr-3"));
        assert_eq!(first, delivery_of(&store, &key("claimed")).await);
        assert_eq!(store.claim(&key("claimed"), 1, LEASE).await.unwrap(), None);
        assert!(store.claim_due(10, LEASE).await.unwrap().is_empty());
        // A re-vote while that lease is live keeps it (not claimed again); the holder's ticket
        // still renews it.
        let r = store
            .vote_on_link(&offer("claimed", None), &inline, true, Some(LEASE))
            .await
            .unwrap();
        assert!(!r.claimed);
        let second = r.written.expect("written");
        assert_eq!((second.version, second.attempts, second.claims), (2, 0, 1));
        assert!(store.renew_lease(&first.ticket(), LEASE).await.unwrap());
        assert_eq!(store.claim(&key("claimed"), 2, LEASE).await.unwrap(), None);
        // Once the lease is released (the holder's attempt finished on the old version), the
        // next vote claims it again.
        store
            .finish(&first.ticket(), &AssessmentFact::Unchanged, &Outcome::Done)
            .await
            .unwrap();
        let r = store
            .vote_on_link(&offer("claimed", None), &inline, true, Some(LEASE))
            .await
            .unwrap();
        assert!(r.claimed);
        let third = r.written.expect("written");
        assert_eq!((third.version, third.attempts, third.claims), (3, 1, 2));
    }

    pub async fn upsert_vote_bumps_version_and_keeps_assessment(store: SharedStore) {
        let k = key("m1");
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &Enqueue::Pending)
            .await
            .unwrap();
        let claimed = store.claim(&k, 1, LEASE).await.unwrap().unwrap();
        assert_eq!(claimed.attempts, 1);
        let fact = AssessmentFact::Exists {
            assessment_id: "a-1".into(),
            trace_id: "tr-1".into(),
        };
        assert_eq!(
            store
                .finish(&claimed.ticket(), &fact, &Outcome::Done)
                .await
                .unwrap(),
            Finished::Applied
        );
        assert_eq!(delivery_of(&store, &k).await.state, DeliveryState::Done);

        let d = store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(false)), &Enqueue::Pending)
            .await
            .unwrap();
        assert_eq!(d.version, 2);
        assert_eq!(d.state, DeliveryState::Pending);
        assert_eq!(d.attempts, 0);
        assert_eq!(d.assessment_id.as_deref(), Some("a-1"));
        assert_eq!(d.trace_id.as_deref(), Some("tr-1"));
        assert_eq!(
            d.desired,
            Desired::Upsert {
                value: FeedbackValue::Bool(false),
                comment: None
            }
        );
        let votes = store
            .list_votes("chat-1", "alice@example.com")
            .await
            .unwrap();
        assert_eq!(votes.len(), 1);
        assert_eq!(votes[0].value, FeedbackValue::Bool(false));
    }

    pub async fn values_round_trip(store: SharedStore) {
        let values = [
            FeedbackValue::Bool(false),
            FeedbackValue::Number(4.5),
            FeedbackValue::Number(-3.0),
            FeedbackValue::String("thumbs_up ✓ \"quoted\"".into()),
        ];
        for (i, v) in values.iter().enumerate() {
            let m = format!("m{i}");
            let d = store
                .upsert_vote(&vote(&m, v.clone()), &Enqueue::Pending)
                .await
                .unwrap();
            assert_eq!(
                d.desired,
                Desired::Upsert {
                    value: v.clone(),
                    comment: None
                }
            );
        }
        let stored: Vec<FeedbackValue> = store
            .list_votes("chat-1", "alice@example.com")
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.value)
            .collect();
        assert_eq!(stored, values);
        let err = store
            .upsert_vote(
                &vote("nan", FeedbackValue::Number(f64::NAN)),
                &Enqueue::Pending,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Query(_)), "{err:?}");
        assert_eq!(store.list_deliveries(None, 100).await.unwrap().len(), 4);
    }

    pub async fn waiting_delivery_is_woken_by_a_trace_id(store: SharedStore) {
        store
            .record_links(&[link("m1", "alice@example.com")])
            .await
            .unwrap();
        let d = store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &waiting())
            .await
            .unwrap();
        assert_eq!(d.state, DeliveryState::Waiting);
        assert_eq!(d.last_error.as_deref(), Some("no_trace_id"));
        assert!(store.claim_due(10, LEASE).await.unwrap().is_empty());
        assert_eq!(store.claim(&key("m1"), 1, LEASE).await.unwrap(), None);

        let mut traced = link("m1", "alice@example.com");
        traced.trace_id = Some("tr-1".into());
        traced.open = false;
        store.record_links(&[traced]).await.unwrap();
        let woken = delivery_of(&store, &key("m1")).await;
        assert_eq!(woken.state, DeliveryState::Pending);
        assert_eq!(woken.attempts, 0);
        assert_eq!(woken.last_error, None);
        assert!(woken.enqueued_at >= d.enqueued_at);
        let claimed = store.claim_due(10, LEASE).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].key, key("m1"));
    }

    pub async fn waiting_delivery_is_woken_by_a_client_request_id(store: SharedStore) {
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &waiting())
            .await
            .unwrap();
        // Another message's link does not wake it.
        let mut other = link("m2", "alice");
        other.trace_id = Some("tr-2".into());
        store.record_links(&[other]).await.unwrap();
        assert_eq!(
            delivery_of(&store, &key("m1")).await.state,
            DeliveryState::Waiting
        );
        let mut l = link("m1", "alice@example.com");
        l.client_request_id = Some("req-1".into());
        store.record_links(&[l]).await.unwrap();
        assert_eq!(
            delivery_of(&store, &key("m1")).await.state,
            DeliveryState::Pending
        );
    }

    pub async fn link_without_ids_does_not_wake(store: SharedStore) {
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &waiting())
            .await
            .unwrap();
        let mut l = link("m1", "alice");
        l.open = false;
        store.record_links(&[l]).await.unwrap();
        let d = delivery_of(&store, &key("m1")).await;
        assert_eq!(d.state, DeliveryState::Waiting);
        assert_eq!(d.last_error.as_deref(), Some("no_trace_id"));
    }

    /// Only deliveries waiting for a trace are woken: one held because MLflow is not configured
    /// stays held, whatever links arrive, until an operator requeues it.
    pub async fn held_deliveries_are_not_woken_by_links(store: SharedStore) {
        let held = Enqueue::Waiting {
            reason: "no_experiment_id".into(),
        };
        let mut traced = link("m1", "alice");
        traced.trace_id = Some("tr-1".into());
        store
            .record_links(std::slice::from_ref(&traced))
            .await
            .unwrap();
        let d = store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &held)
            .await
            .unwrap();
        assert_eq!(d.state, DeliveryState::Waiting);
        assert_eq!(d.last_error.as_deref(), Some("no_experiment_id"));
        store.record_links(&[traced]).await.unwrap();
        let d = delivery_of(&store, &key("m1")).await;
        assert_eq!(d.state, DeliveryState::Waiting);
        assert!(store.claim_due(10, LEASE).await.unwrap().is_empty());
        assert_eq!(
            store.requeue(DeliveryState::Waiting, None).await.unwrap(),
            1
        );
        assert_eq!(
            delivery_of(&store, &key("m1")).await.state,
            DeliveryState::Pending
        );
    }

    /// The wake-up race, deterministic half: the caller decided "waiting" from a link read
    /// before a trace id arrived, and `record_links` (with its wake-up) committed before the
    /// vote did. The vote must not be parked past its wake-up.
    pub async fn waiting_vote_after_the_wake_is_pending(store: SharedStore) {
        store
            .record_links(&[link("m1", "alice@example.com")])
            .await
            .unwrap();
        let mut traced = link("m1", "alice@example.com");
        traced.trace_id = Some("tr-1".into());
        store.record_links(&[traced]).await.unwrap();
        let d = store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &waiting())
            .await
            .unwrap();
        assert_eq!(d.state, DeliveryState::Pending);
        assert_eq!(d.last_error, None);
    }

    pub async fn retract_vote_enqueues_a_deletion(store: SharedStore) {
        assert_eq!(
            store
                .retract_vote(&key("m1"), Duration::ZERO)
                .await
                .unwrap(),
            None
        );
        assert!(store.list_deliveries(None, 10).await.unwrap().is_empty());

        let k = key("m1");
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &Enqueue::Pending)
            .await
            .unwrap();
        let claimed = store.claim(&k, 1, LEASE).await.unwrap().unwrap();
        let fact = AssessmentFact::Exists {
            assessment_id: "a-1".into(),
            trace_id: "tr-1".into(),
        };
        store
            .finish(&claimed.ticket(), &fact, &Outcome::Done)
            .await
            .unwrap();

        let d = store
            .retract_vote(&k, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.desired, Desired::Delete);
        assert_eq!(d.version, 2);
        assert_eq!(d.state, DeliveryState::Pending);
        assert_eq!(d.attempts, 0);
        assert_eq!(d.assessment_id.as_deref(), Some("a-1"));
        assert_eq!(d.trace_id.as_deref(), Some("tr-1"));
        assert_eq!(d.chat_id, "chat-1");
        assert!(
            store
                .list_votes("chat-1", "alice@example.com")
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.retract_vote(&k, Duration::ZERO).await.unwrap(), None);
        assert_eq!(delivery_of(&store, &k).await.version, 2);
    }

    pub async fn inline_enqueues_are_held_from_the_worker(store: SharedStore) {
        let k = key("m1");
        let inline = Enqueue::Inline {
            hold: Duration::from_secs(60),
        };
        let d = store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &inline)
            .await
            .unwrap();
        assert_eq!(d.state, DeliveryState::Pending);
        assert!(
            store.claim_due(10, LEASE).await.unwrap().is_empty(),
            "the worker leaves it to the inline attempt"
        );
        let c = store
            .claim(&k, 1, LEASE)
            .await
            .unwrap()
            .expect("inline claim");
        store
            .finish(&c.ticket(), &AssessmentFact::Unchanged, &Outcome::Done)
            .await
            .unwrap();
        let d = store
            .retract_vote(&k, Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert!(store.claim_due(10, LEASE).await.unwrap().is_empty());
        assert!(store.claim(&k, d.version, LEASE).await.unwrap().is_some());

        // Without an inline attempt (a crash), the worker takes over after the hold.
        let short = Enqueue::Inline {
            hold: Duration::from_millis(300),
        };
        store
            .upsert_vote(&vote("m2", FeedbackValue::Bool(true)), &short)
            .await
            .unwrap();
        assert!(store.claim_due(10, LEASE).await.unwrap().is_empty());
        let due = next_due(&store, "the worker never got the held delivery").await;
        assert_eq!(due.key, key("m2"));
    }

    pub async fn list_votes_filters_and_orders(store: SharedStore) {
        let put = |m: &str, user: &str, name: &str, chat: &str| NewVote {
            key: VoteKey {
                message_id: m.into(),
                user_id: user.into(),
                name: name.into(),
            },
            chat_id: chat.into(),
            value: FeedbackValue::Bool(true),
            comment: None,
        };
        let votes = [
            put("m2", "alice", "user_feedback", "c1"),
            put("m1", "alice", "rating", "c1"),
            put("m1", "alice", "user_feedback", "c1"),
            put("m3", "bob", "user_feedback", "c1"),
            put("m4", "alice", "user_feedback", "c2"),
        ];
        for v in &votes {
            store.upsert_vote(v, &Enqueue::Pending).await.unwrap();
        }
        let got: Vec<(String, String)> = store
            .list_votes("c1", "alice")
            .await
            .unwrap()
            .into_iter()
            .map(|v| (v.key.message_id, v.key.name))
            .collect();
        assert_eq!(
            got,
            [
                ("m1".to_owned(), "rating".to_owned()),
                ("m1".to_owned(), "user_feedback".to_owned()),
                ("m2".to_owned(), "user_feedback".to_owned()),
            ]
        );
        assert!(store.list_votes("c3", "alice").await.unwrap().is_empty());
    }

    pub async fn claim_due_leases_due_work_oldest_first(store: SharedStore) {
        assert!(store.claim_due(10, LEASE).await.unwrap().is_empty());
        for m in ["m1", "m2", "m3", "m4"] {
            store
                .upsert_vote(&vote(m, FeedbackValue::Bool(true)), &Enqueue::Pending)
                .await
                .unwrap();
        }
        // m1 retries far in the future; m2 was due long ago; m3 finished; m4 due now.
        let now = SystemTime::now();
        let later = Outcome::Retry {
            at: now + Duration::from_secs(3600),
            error: "HTTP 404".into(),
        };
        let earlier = Outcome::Retry {
            at: now - Duration::from_secs(3600),
            error: "HTTP 503".into(),
        };
        for (m, outcome) in [("m1", &later), ("m2", &earlier), ("m3", &Outcome::Done)] {
            let d = store.claim(&key(m), 1, LEASE).await.unwrap().unwrap();
            let finished = store
                .finish(&d.ticket(), &AssessmentFact::Unchanged, outcome)
                .await
                .unwrap();
            assert_eq!(finished, Finished::Applied, "{m}");
        }

        assert!(store.claim_due(0, LEASE).await.unwrap().is_empty());
        let first = store.claim_due(1, LEASE).await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].key, key("m2"), "oldest due first");
        assert_eq!(first[0].attempts, 2);
        assert_eq!(first[0].last_error.as_deref(), Some("HTTP 503"));
        let rest = store.claim_due(10, LEASE).await.unwrap();
        let keys: Vec<_> = rest.iter().map(|d| d.key.message_id.as_str()).collect();
        assert_eq!(keys, ["m4"]);
        assert_eq!(rest[0].attempts, 1);
        assert!(
            store.claim_due(10, LEASE).await.unwrap().is_empty(),
            "leased"
        );
    }

    pub async fn expired_lease_can_be_claimed_again(store: SharedStore) {
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &Enqueue::Pending)
            .await
            .unwrap();
        let short = Duration::from_millis(300);
        assert_eq!(store.claim_due(10, short).await.unwrap().len(), 1);
        assert!(store.claim_due(10, short).await.unwrap().is_empty());
        let again = next_due(&store, "the expired lease was never released").await;
        assert_eq!(again.attempts, 2);
    }

    pub async fn an_attempt_that_outlived_its_lease_cannot_finish_over_the_next_claim(
        store: SharedStore,
    ) {
        let k = key("m1");
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &Enqueue::Pending)
            .await
            .unwrap();
        let slow = store
            .claim(&k, 1, Duration::from_millis(200))
            .await
            .unwrap()
            .unwrap();
        let next = next_due(&store, "the expired lease was never released").await;
        assert_eq!(next.claims, slow.claims + 1);

        // The slow attempt created an assessment the delivery did not know of yet: that is
        // recorded (else it would be created twice), nothing else is.
        let created = AssessmentFact::Exists {
            assessment_id: "a-slow".into(),
            trace_id: "tr-1".into(),
        };
        assert_eq!(
            store
                .finish(&slow.ticket(), &created, &Outcome::Done)
                .await
                .unwrap(),
            Finished::LeaseLost
        );
        let d = delivery_of(&store, &k).await;
        assert_eq!(
            d.state,
            DeliveryState::Pending,
            "the outcome is not applied"
        );
        assert_eq!(d.assessment_id.as_deref(), Some("a-slow"));
        assert_eq!(d.trace_id.as_deref(), Some("tr-1"));
        assert!(
            store.claim_due(10, LEASE).await.unwrap().is_empty(),
            "the next claim keeps its lease"
        );
        // A stale Gone or a different id does not overwrite what the delivery knows.
        let other = AssessmentFact::Exists {
            assessment_id: "a-other".into(),
            trace_id: "tr-2".into(),
        };
        for fact in [AssessmentFact::Gone, other] {
            let dead = Outcome::Dead { error: "x".into() };
            assert_eq!(
                store.finish(&slow.ticket(), &fact, &dead).await.unwrap(),
                Finished::LeaseLost
            );
        }
        let d = delivery_of(&store, &k).await;
        assert_eq!(
            (d.assessment_id.as_deref(), d.generation, d.state),
            (Some("a-slow"), 0, DeliveryState::Pending)
        );

        // The current claim finishes normally.
        let patched = AssessmentFact::Exists {
            assessment_id: "a-slow".into(),
            trace_id: "tr-1".into(),
        };
        assert_eq!(
            store
                .finish(&next.ticket(), &patched, &Outcome::Done)
                .await
                .unwrap(),
            Finished::Applied
        );
        assert_eq!(delivery_of(&store, &k).await.state, DeliveryState::Done);
        // Claims are counted across versions: a newer vote's claim is a new ticket again.
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(false)), &Enqueue::Pending)
            .await
            .unwrap();
        let third = store.claim(&k, 2, LEASE).await.unwrap().unwrap();
        assert_eq!((third.claims, third.attempts), (next.claims + 1, 1));
    }

    pub async fn claim_one_checks_version_state_and_lease(store: SharedStore) {
        let k = key("m1");
        assert_eq!(
            store.claim(&k, 1, LEASE).await.unwrap(),
            None,
            "no delivery"
        );
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &Enqueue::Pending)
            .await
            .unwrap();
        assert_eq!(
            store.claim(&k, 2, LEASE).await.unwrap(),
            None,
            "wrong version"
        );
        let d = store.claim(&k, 1, LEASE).await.unwrap().unwrap();
        assert_eq!((d.version, d.attempts), (1, 1));
        assert_eq!(store.claim(&k, 1, LEASE).await.unwrap(), None, "leased");
        // Not due (a retry in an hour) does not stop the inline claim.
        let later = Outcome::Retry {
            at: SystemTime::now() + Duration::from_secs(3600),
            error: "e".into(),
        };
        store
            .finish(&d.ticket(), &AssessmentFact::Unchanged, &later)
            .await
            .unwrap();
        let d = store.claim(&k, 1, LEASE).await.unwrap().unwrap();
        assert_eq!(d.attempts, 2);
        store
            .finish(&d.ticket(), &AssessmentFact::Unchanged, &Outcome::Done)
            .await
            .unwrap();
        assert_eq!(store.claim(&k, 1, LEASE).await.unwrap(), None, "done");
    }

    pub async fn finish_applies_each_outcome(store: SharedStore) {
        let k = key("m1");
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &Enqueue::Pending)
            .await
            .unwrap();
        let unknown = Ticket {
            key: key("unknown"),
            version: 1,
            claim: 1,
        };
        assert_eq!(
            store
                .finish(&unknown, &AssessmentFact::Unchanged, &Outcome::Done)
                .await
                .unwrap(),
            Finished::Missing
        );

        let d = store.claim(&k, 1, LEASE).await.unwrap().unwrap();
        let at = SystemTime::now() - Duration::from_secs(1);
        let retry = Outcome::Retry {
            at,
            error: "HTTP 404: trace not found".into(),
        };
        assert_eq!(
            store
                .finish(&d.ticket(), &AssessmentFact::Unchanged, &retry)
                .await
                .unwrap(),
            Finished::Applied
        );
        let d = delivery_of(&store, &k).await;
        assert_eq!(d.state, DeliveryState::Pending);
        assert_eq!(d.last_error.as_deref(), Some("HTTP 404: trace not found"));
        let ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        };
        assert!(
            ms(d.next_attempt_at).abs_diff(ms(at)) <= 1,
            "due at the retry time"
        );
        // The lease was released: due again at once.
        let due = store.claim_due(10, LEASE).await.unwrap();
        assert_eq!(due.len(), 1);

        let park = Outcome::Park {
            reason: "no_experiment_id".into(),
        };
        assert_eq!(
            store
                .finish(&due[0].ticket(), &AssessmentFact::Unchanged, &park)
                .await
                .unwrap(),
            Finished::Applied
        );
        let d = delivery_of(&store, &k).await;
        assert_eq!(d.state, DeliveryState::Waiting);
        assert_eq!(d.last_error.as_deref(), Some("no_experiment_id"));

        assert_eq!(
            store
                .requeue(DeliveryState::Waiting, Some(&k))
                .await
                .unwrap(),
            1
        );
        let d = store.claim(&k, 1, LEASE).await.unwrap().unwrap();
        let dead = Outcome::Dead {
            error: "HTTP 403: forbidden".into(),
        };
        assert_eq!(
            store
                .finish(&d.ticket(), &AssessmentFact::Unchanged, &dead)
                .await
                .unwrap(),
            Finished::Applied
        );
        let d = delivery_of(&store, &k).await;
        assert_eq!(d.state, DeliveryState::Dead);
        assert_eq!(d.last_error.as_deref(), Some("HTTP 403: forbidden"));

        assert_eq!(store.requeue(DeliveryState::Dead, None).await.unwrap(), 1);
        let d = store.claim(&k, 1, LEASE).await.unwrap().unwrap();
        assert_eq!(
            store
                .finish(&d.ticket(), &AssessmentFact::Unchanged, &Outcome::Done)
                .await
                .unwrap(),
            Finished::Applied
        );
        let d = delivery_of(&store, &k).await;
        assert_eq!(d.state, DeliveryState::Done);
        assert_eq!(d.last_error, None);
    }

    pub async fn finish_with_stale_version_records_fact_only(store: SharedStore) {
        let k = key("m1");
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &Enqueue::Pending)
            .await
            .unwrap();
        let v1 = store.claim(&k, 1, LEASE).await.unwrap().unwrap();
        // The user changes the vote while the attempt on version 1 is in flight.
        let v2 = store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(false)), &Enqueue::Pending)
            .await
            .unwrap();
        assert_eq!(v2.version, 2);
        let fact = AssessmentFact::Exists {
            assessment_id: "a-1".into(),
            trace_id: "tr-1".into(),
        };
        assert_eq!(
            store
                .finish(&v1.ticket(), &fact, &Outcome::Done)
                .await
                .unwrap(),
            Finished::Superseded
        );
        let d = delivery_of(&store, &k).await;
        assert_eq!(
            d.state,
            DeliveryState::Pending,
            "the newer vote is not done"
        );
        assert_eq!(d.version, 2);
        assert_eq!(
            d.assessment_id.as_deref(),
            Some("a-1"),
            "the fact is recorded"
        );
        assert_eq!(d.trace_id.as_deref(), Some("tr-1"));
        // The lease is released: the newer version is due at once.
        let next = store.claim_due(10, LEASE).await.unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].version, 2);
        assert_eq!(
            next[0].desired,
            Desired::Upsert {
                value: FeedbackValue::Bool(false),
                comment: None
            }
        );
        // A stale Dead (its claim long superseded too) is not applied either.
        let dead = Outcome::Dead { error: "x".into() };
        assert_eq!(
            store
                .finish(&v1.ticket(), &AssessmentFact::Unchanged, &dead)
                .await
                .unwrap(),
            Finished::LeaseLost
        );
        assert_eq!(delivery_of(&store, &k).await.state, DeliveryState::Pending);
    }

    pub async fn finish_gone_bumps_generation(store: SharedStore) {
        let k = key("m1");
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &Enqueue::Pending)
            .await
            .unwrap();
        let fact = AssessmentFact::Exists {
            assessment_id: "a-1".into(),
            trace_id: "tr-1".into(),
        };
        let d = store.claim(&k, 1, LEASE).await.unwrap().unwrap();
        store
            .finish(&d.ticket(), &fact, &Outcome::Done)
            .await
            .unwrap();
        store
            .retract_vote(&k, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        let d = store.claim(&k, 2, LEASE).await.unwrap().unwrap();
        // A newer vote arrives before the deletion finishes: the fact still lands.
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &Enqueue::Pending)
            .await
            .unwrap();
        assert_eq!(
            store
                .finish(&d.ticket(), &AssessmentFact::Gone, &Outcome::Done)
                .await
                .unwrap(),
            Finished::Superseded
        );
        let d = delivery_of(&store, &k).await;
        assert_eq!(d.assessment_id, None);
        assert_eq!(d.generation, 1);
        assert_eq!(
            d.trace_id.as_deref(),
            Some("tr-1"),
            "the trace is remembered"
        );
        assert_eq!(d.version, 3);
        assert_eq!(d.state, DeliveryState::Pending);
        // Unchanged leaves the fact columns alone.
        let d = store.claim(&k, 3, LEASE).await.unwrap().unwrap();
        store
            .finish(&d.ticket(), &AssessmentFact::Unchanged, &Outcome::Done)
            .await
            .unwrap();
        let d = delivery_of(&store, &k).await;
        assert_eq!((d.assessment_id, d.generation), (None, 1));
    }

    pub async fn upsert_keeps_the_lease(store: SharedStore) {
        let k = key("m1");
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &Enqueue::Pending)
            .await
            .unwrap();
        let c = store.claim(&k, 1, LEASE).await.unwrap().unwrap();
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(false)), &Enqueue::Pending)
            .await
            .unwrap();
        assert!(
            store.claim_due(10, LEASE).await.unwrap().is_empty(),
            "still leased"
        );
        assert_eq!(
            store.claim(&k, 2, LEASE).await.unwrap(),
            None,
            "still leased"
        );
        assert_eq!(
            store
                .finish(&c.ticket(), &AssessmentFact::Unchanged, &Outcome::Done)
                .await
                .unwrap(),
            Finished::Superseded
        );
        assert_eq!(store.claim(&k, 2, LEASE).await.unwrap().unwrap().version, 2);
    }

    pub async fn list_deliveries_newest_first(store: SharedStore) {
        for m in ["m1", "m2", "m3"] {
            store
                .upsert_vote(&vote(m, FeedbackValue::Bool(true)), &Enqueue::Pending)
                .await
                .unwrap();
            // Distinct update times (SQLite keeps milliseconds).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let c = store.claim(&key("m1"), 1, LEASE).await.unwrap().unwrap();
        let dead = Outcome::Dead { error: "x".into() };
        store
            .finish(&c.ticket(), &AssessmentFact::Unchanged, &dead)
            .await
            .unwrap();
        let all: Vec<_> = store
            .list_deliveries(None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.key.message_id)
            .collect();
        assert_eq!(all, ["m1", "m3", "m2"]);
        let two = store.list_deliveries(None, 2).await.unwrap();
        assert_eq!(two.len(), 2);
        let dead: Vec<_> = store
            .list_deliveries(Some(DeliveryState::Dead), 10)
            .await
            .unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].key, key("m1"));
        assert!(
            store
                .list_deliveries(Some(DeliveryState::Waiting), 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// Issue 14, finding 6: `deliveries list` pages with a cursor. Rows written in the same
    /// millisecond (ties on `updated_at`) and a row written while paging must neither repeat
    /// nor be skipped (the new one sorts in front of the walk and is not seen by it).
    pub async fn list_deliveries_pages_neither_repeat_nor_skip(store: SharedStore) {
        for i in 0..25 {
            store
                .upsert_vote(
                    &vote(&format!("m{i:02}"), FeedbackValue::Bool(true)),
                    &Enqueue::Pending,
                )
                .await
                .unwrap();
        }
        let all: Vec<_> = store
            .list_deliveries(None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.key)
            .collect();
        assert_eq!(all.len(), 25);
        let mut seen = Vec::new();
        let mut after: Option<DeliveryCursor> = None;
        loop {
            let page = store
                .list_deliveries_after(None, 7, after.as_ref())
                .await
                .unwrap();
            if seen.len() == 7 {
                // A vote arriving in the middle of the walk.
                store
                    .upsert_vote(
                        &vote("m-late", FeedbackValue::Bool(false)),
                        &Enqueue::Pending,
                    )
                    .await
                    .unwrap();
            }
            let Some(last) = page.last() else { break };
            // The cursor survives its text form (what the CLI prints and reads back).
            let text = DeliveryCursor::of(last).encode();
            after = Some(DeliveryCursor::decode(&text).expect("cursor round trip"));
            seen.extend(page.into_iter().map(|d| d.key));
        }
        assert_eq!(seen, all);
        assert!(DeliveryCursor::decode("nonsense").is_none());
        assert!(DeliveryCursor::decode("12.!!!").is_none());
        // Filtered by state, too.
        let pending = store
            .list_deliveries_after(Some(DeliveryState::Pending), 100, None)
            .await
            .unwrap();
        assert_eq!(pending.len(), 26);
    }

    /// Issue 14, finding 5: an attempt renews its lease while it runs; a renewal by a claim
    /// that no longer holds the delivery (finished, or claimed again after expiry) fails.
    pub async fn renew_lease_extends_only_the_holding_claim(store: SharedStore) {
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &Enqueue::Pending)
            .await
            .unwrap();
        let short = Duration::from_millis(300);
        let first = store.claim_due(1, short).await.unwrap().remove(0);
        // Renewed for longer: nobody can claim it when the short lease would have run out.
        assert!(store.renew_lease(&first.ticket(), LEASE).await.unwrap());
        let after_short = tokio::time::Instant::now() + short * 2;
        loop {
            assert!(store.claim_due(1, LEASE).await.unwrap().is_empty());
            if tokio::time::Instant::now() >= after_short {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let it lapse (renewed to a short lease again), then another claim takes it.
        assert!(store.renew_lease(&first.ticket(), short).await.unwrap());
        let second = loop {
            let mut c = store.claim_due(1, LEASE).await.unwrap();
            if let Some(d) = c.pop() {
                break d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(second.claims > first.claims);
        assert!(
            !store.renew_lease(&first.ticket(), LEASE).await.unwrap(),
            "the old claim no longer holds it"
        );
        assert!(store.renew_lease(&second.ticket(), LEASE).await.unwrap());
        store
            .finish(&second.ticket(), &AssessmentFact::Unchanged, &Outcome::Done)
            .await
            .unwrap();
        assert!(
            !store.renew_lease(&second.ticket(), LEASE).await.unwrap(),
            "a finished attempt has no lease to renew"
        );
    }

    pub async fn dead_reasons_count_by_reason(store: SharedStore) {
        assert!(store.dead_reasons(10).await.unwrap().is_empty());
        for (m, reason) in [("m1", "a"), ("m2", "b"), ("m3", "a"), ("m4", "a")] {
            store
                .upsert_vote(&vote(m, FeedbackValue::Bool(true)), &Enqueue::Pending)
                .await
                .unwrap();
            let c = store.claim(&key(m), 1, LEASE).await.unwrap().unwrap();
            store
                .finish(
                    &c.ticket(),
                    &AssessmentFact::Unchanged,
                    &Outcome::Dead {
                        error: reason.into(),
                    },
                )
                .await
                .unwrap();
        }
        assert_eq!(
            store.dead_reasons(10).await.unwrap(),
            [("a".to_owned(), 3), ("b".to_owned(), 1)]
        );
        assert_eq!(store.dead_reasons(1).await.unwrap().len(), 1);
    }

    pub async fn requeue_resets_dead_and_waiting(store: SharedStore) {
        let dead = Outcome::Dead {
            error: "gave up".into(),
        };
        for m in ["m1", "m2"] {
            store
                .upsert_vote(&vote(m, FeedbackValue::Bool(true)), &Enqueue::Pending)
                .await
                .unwrap();
            let c = store.claim(&key(m), 1, LEASE).await.unwrap().unwrap();
            store
                .finish(&c.ticket(), &AssessmentFact::Unchanged, &dead)
                .await
                .unwrap();
        }
        store
            .upsert_vote(&vote("m3", FeedbackValue::Bool(true)), &waiting())
            .await
            .unwrap();
        let before = delivery_of(&store, &key("m1")).await;
        tokio::time::sleep(Duration::from_millis(5)).await;

        assert_eq!(
            store
                .requeue(DeliveryState::Dead, Some(&key("m1")))
                .await
                .unwrap(),
            1
        );
        let d = delivery_of(&store, &key("m1")).await;
        assert_eq!(d.state, DeliveryState::Pending);
        assert_eq!(d.attempts, 0);
        assert!(d.enqueued_at > before.enqueued_at);
        assert_eq!(
            d.last_error.as_deref(),
            Some("gave up"),
            "kept for the record"
        );
        assert_eq!(
            delivery_of(&store, &key("m2")).await.state,
            DeliveryState::Dead
        );
        assert_eq!(store.requeue(DeliveryState::Dead, None).await.unwrap(), 1);
        assert_eq!(store.requeue(DeliveryState::Dead, None).await.unwrap(), 0);
        assert_eq!(
            store.requeue(DeliveryState::Waiting, None).await.unwrap(),
            1
        );
        assert_eq!(store.claim_due(10, LEASE).await.unwrap().len(), 3);
    }

    pub async fn requeue_held_releases_only_that_reason(store: SharedStore) {
        let held = Enqueue::Waiting {
            reason: "no_experiment_id".into(),
        };
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &held)
            .await
            .unwrap();
        store
            .upsert_vote(&vote("m2", FeedbackValue::Bool(true)), &waiting())
            .await
            .unwrap();
        let before = delivery_of(&store, &key("m1")).await;
        tokio::time::sleep(Duration::from_millis(5)).await;

        assert_eq!(store.requeue_held("no_experiment_id").await.unwrap(), 1);
        let d = delivery_of(&store, &key("m1")).await;
        assert_eq!(
            (d.state, d.attempts, d.last_error.as_deref()),
            (DeliveryState::Pending, 0, None)
        );
        assert!(d.enqueued_at > before.enqueued_at);
        assert_eq!(
            delivery_of(&store, &key("m2")).await.state,
            DeliveryState::Waiting,
            "another reason stays held"
        );
        assert_eq!(store.requeue_held("no_experiment_id").await.unwrap(), 0);
        let due = store.claim_due(10, LEASE).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].key, key("m1"));
    }

    pub async fn delivery_stats_count_states(store: SharedStore) {
        let empty = store.delivery_stats().await.unwrap();
        assert_eq!(empty, Default::default());
        for m in ["m1", "m2", "m3", "m4"] {
            store
                .upsert_vote(&vote(m, FeedbackValue::Bool(true)), &Enqueue::Pending)
                .await
                .unwrap();
        }
        store
            .upsert_vote(&vote("m5", FeedbackValue::Bool(true)), &waiting())
            .await
            .unwrap();
        let c = store.claim(&key("m1"), 1, LEASE).await.unwrap().unwrap();
        store
            .finish(&c.ticket(), &AssessmentFact::Unchanged, &Outcome::Done)
            .await
            .unwrap();
        let c = store.claim(&key("m2"), 1, LEASE).await.unwrap().unwrap();
        let dead = Outcome::Dead { error: "x".into() };
        store
            .finish(&c.ticket(), &AssessmentFact::Unchanged, &dead)
            .await
            .unwrap();
        let s = store.delivery_stats().await.unwrap();
        assert_eq!((s.pending, s.waiting, s.done, s.dead), (2, 1, 1, 1));
        let age = s.oldest_pending.expect("an oldest pending age");
        assert!(age < Duration::from_secs(60), "{age:?}");
    }

    pub async fn fifty_concurrent_upserts_leave_one_vote_and_one_delivery(store: SharedStore) {
        let barrier = Arc::new(tokio::sync::Barrier::new(50));
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let d = store
                        .upsert_vote(
                            &vote("m1", FeedbackValue::Number(f64::from(i))),
                            &Enqueue::Pending,
                        )
                        .await
                        .unwrap();
                    (d.version, i)
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        let versions: HashSet<i64> = results.iter().map(|(v, _)| *v).collect();
        assert_eq!(
            versions,
            (1..=50).collect(),
            "each upsert got its own version"
        );
        let last = results
            .iter()
            .find(|(v, _)| *v == 50)
            .map(|(_, i)| FeedbackValue::Number(f64::from(*i)))
            .unwrap();

        let votes = store
            .list_votes("chat-1", "alice@example.com")
            .await
            .unwrap();
        assert_eq!(votes.len(), 1);
        assert_eq!(votes[0].value, last, "the vote is the last version's");
        let deliveries = store.list_deliveries(None, 100).await.unwrap();
        assert_eq!(deliveries.len(), 1);
        assert_eq!(deliveries[0].version, 50);
        assert_eq!(deliveries[0].state, DeliveryState::Pending);
        assert_eq!(
            deliveries[0].desired,
            Desired::Upsert {
                value: last,
                comment: None
            }
        );
        let stats = store.delivery_stats().await.unwrap();
        assert_eq!((stats.pending, stats.done), (1, 0));
    }

    pub async fn concurrent_claimers_never_share_a_delivery(store: SharedStore) {
        const N: usize = 120;
        for i in 0..N {
            store
                .upsert_vote(
                    &vote(&format!("m{i:03}"), FeedbackValue::Bool(true)),
                    &Enqueue::Pending,
                )
                .await
                .unwrap();
        }
        let barrier = Arc::new(tokio::sync::Barrier::new(4));
        let claimers: Vec<_> = (0..4)
            .map(|_| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let mut mine = Vec::new();
                    loop {
                        let got = store.claim_due(7, LEASE).await.unwrap();
                        if got.is_empty() {
                            return mine;
                        }
                        mine.extend(got.into_iter().map(|d| d.key));
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for c in claimers {
            all.extend(c.await.unwrap());
        }
        let distinct: HashSet<_> = all.iter().cloned().collect();
        assert_eq!(all.len(), distinct.len(), "a delivery was claimed twice");
        assert_eq!(distinct.len(), N, "every due delivery was claimed");
    }

    pub async fn concurrent_stale_finish_never_marks_newer_vote_done(store: SharedStore) {
        // Workers finish attempts on whatever version they claimed while the user keeps
        // changing the vote; at the end the newest version must not be marked done unless an
        // attempt on it finished.
        let k = key("m1");
        store
            .upsert_vote(&vote("m1", FeedbackValue::Number(0.0)), &Enqueue::Pending)
            .await
            .unwrap();
        let voter = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 1..=30 {
                    store
                        .upsert_vote(
                            &vote("m1", FeedbackValue::Number(f64::from(i))),
                            &Enqueue::Pending,
                        )
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        // The worker runs until the voter is done AND it has finished one attempt (a fixed
        // number of rounds could all fall before the first vote is due on a busy machine),
        // bounded by a deadline.
        let voting = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let worker = {
            let store = store.clone();
            let voting = voting.clone();
            tokio::spawn(async move {
                let mut done_versions = Vec::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                let mut rounds = 0;
                while rounds < 200
                    || voting.load(std::sync::atomic::Ordering::SeqCst)
                    || done_versions.is_empty()
                {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no attempt finished within 30 s"
                    );
                    rounds += 1;
                    for d in store.claim_due(1, LEASE).await.unwrap() {
                        let fact = AssessmentFact::Exists {
                            assessment_id: "a-1".into(),
                            trace_id: "tr-1".into(),
                        };
                        let finished = store
                            .finish(&d.ticket(), &fact, &Outcome::Done)
                            .await
                            .unwrap();
                        if finished == Finished::Applied {
                            done_versions.push(d.version);
                        }
                    }
                    tokio::task::yield_now().await;
                }
                done_versions
            })
        };
        voter.await.unwrap();
        voting.store(false, std::sync::atomic::Ordering::SeqCst);
        let done_versions = worker.await.unwrap();
        let d = delivery_of(&store, &k).await;
        assert_eq!(d.version, 31);
        assert_eq!(d.assessment_id.as_deref(), Some("a-1"));
        if d.state == DeliveryState::Done {
            assert!(
                done_versions.contains(&31),
                "done without an attempt on the newest version"
            );
        } else {
            assert_eq!(d.state, DeliveryState::Pending);
            assert!(!done_versions.contains(&31));
        }
    }

    /// The wake-up race, concurrent half: for each message, a waiting vote and the link that
    /// brings its trace id are written at the same time. Whatever the interleaving, no
    /// delivery may stay parked.
    pub async fn waiting_votes_racing_links_are_never_stranded(store: SharedStore) {
        const N: usize = 60;
        let ids: Vec<String> = (0..N).map(|i| format!("race-{i}")).collect();
        let opening: Vec<LinkRecord> = ids.iter().map(|m| link(m, "alice@example.com")).collect();
        store.record_links(&opening).await.unwrap();
        let mut tasks = Vec::new();
        for m in &ids {
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let (s1, b1, m1) = (store.clone(), barrier.clone(), m.clone());
            tasks.push(tokio::spawn(async move {
                b1.wait().await;
                s1.upsert_vote(&vote(&m1, FeedbackValue::Bool(true)), &waiting())
                    .await
                    .unwrap();
            }));
            let (s2, b2, m2) = (store.clone(), barrier, m.clone());
            tasks.push(tokio::spawn(async move {
                b2.wait().await;
                let mut l = link(&m2, "alice@example.com");
                l.trace_id = Some(format!("tr-{m2}"));
                l.open = false;
                s2.record_links(&[l]).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let stranded: Vec<_> = store
            .list_deliveries(Some(DeliveryState::Waiting), 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.key.message_id)
            .collect();
        assert!(stranded.is_empty(), "parked forever: {stranded:?}");
        assert_eq!(store.delivery_stats().await.unwrap().pending, N as u64);
    }
    /// Ownership (store.rs, "Ownership"): however many users (replicas) race to claim or link
    /// one new message, exactly one owns it, and no later claim or link by anyone else changes
    /// the owner or anything the owner recorded.
    pub async fn racing_owners_leave_one_owner_for_good(store: SharedStore) {
        const USERS: usize = 8;
        for round in 0..5 {
            let m = format!("contested-{round}");
            let barrier = Arc::new(tokio::sync::Barrier::new(USERS));
            let mut tasks = Vec::new();
            for u in 0..USERS {
                let (s, b, m) = (store.clone(), barrier.clone(), m.clone());
                tasks.push(tokio::spawn(async move {
                    let user = format!("user-{u}@example.com");
                    b.wait().await;
                    // Half claim (a client-chosen id), half link (a stream's record).
                    if u % 2 == 0 {
                        let c = s.claim_message(&link(&m, &user)).await.unwrap();
                        (user, Some(c))
                    } else {
                        let mut l = link(&m, &user);
                        l.trace_id = Some(format!("tr-{u}"));
                        s.record_links(&[l]).await.unwrap();
                        (user, None)
                    }
                }));
            }
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await.unwrap());
            }
            let owner = store.get_link(&m).await.unwrap().unwrap();
            for (user, claim) in &results {
                if let Some(c) = claim {
                    let expected = if *user == owner.user_id {
                        Claim::Created
                    } else {
                        Claim::OtherUser
                    };
                    assert_eq!(*c, expected, "{user} on {m} (owner {})", owner.user_id);
                }
            }
            let created = results
                .iter()
                .filter(|(_, c)| *c == Some(Claim::Created))
                .count();
            assert!(created <= 1, "{created} claims of {m} were told Created");
            // Whoever won, the others can no longer change the link.
            for (user, _) in &results {
                if *user != owner.user_id {
                    assert_eq!(
                        store.claim_message(&link(&m, user)).await.unwrap(),
                        Claim::OtherUser
                    );
                    let mut l = link(&m, user);
                    l.trace_id = Some("tr-stolen".into());
                    l.open = false;
                    store.record_links(&[l]).await.unwrap();
                }
            }
            let after = store.get_link(&m).await.unwrap().unwrap();
            assert_eq!(after.user_id, owner.user_id);
            assert_eq!(after.trace_id, owner.trace_id);
            assert_eq!(after.open, owner.open);
        }
    }

    /// A link wakes (and a waiting vote is promoted by) only its owner's deliveries: a vote
    /// another user got stored on the message (before ownership was enforced by the feedback
    /// API, or by any path that skipped it) never follows the owner's trace.
    pub async fn links_wake_only_their_owners_deliveries(store: SharedStore) {
        let bob = VoteKey {
            user_id: "bob@example.com".to_owned(),
            ..key("m1")
        };
        let bobs = NewVote {
            key: bob.clone(),
            ..vote("m1", FeedbackValue::Bool(false))
        };
        store.upsert_vote(&bobs, &waiting()).await.unwrap();
        store
            .upsert_vote(&vote("m1", FeedbackValue::Bool(true)), &waiting())
            .await
            .unwrap();
        let mut traced = link("m1", "alice@example.com");
        traced.trace_id = Some("tr-1".into());
        traced.open = false;
        store.record_links(&[traced]).await.unwrap();
        assert_eq!(
            delivery_of(&store, &key("m1")).await.state,
            DeliveryState::Pending
        );
        let d = delivery_of(&store, &bob).await;
        assert_eq!(d.state, DeliveryState::Waiting);
        assert_eq!(d.last_error.as_deref(), Some("no_trace_id"));

        // Bob votes again after the owner's trace arrived: still not promoted.
        let d = store.upsert_vote(&bobs, &waiting()).await.unwrap();
        assert_eq!(d.state, DeliveryState::Waiting);
        let claimed = store.claim_due(10, LEASE).await.unwrap();
        assert_eq!(
            claimed.iter().map(|d| d.key.clone()).collect::<Vec<_>>(),
            vec![key("m1")]
        );
    }
}
