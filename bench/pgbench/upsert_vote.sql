-- Scenario 5's SQL baseline: the statements one `POST /api/feedback` runs against the Postgres
-- store when MLflow is not configured, statement for statement: since the vote path's one
-- statement (src/store/postgres/votes.rs, VOTE_ON_LINK, which `Store::vote_on_link` runs), that
-- is this one statement, with the parameters such a vote sends (chat named, value, no comment,
-- held `waiting` for reason no_experiment_id, no trace needed, no claim), and the same key
-- distribution as bench/wrk/feedback.lua. The statement is VOTE_ON_LINK with those parameters
-- substituted (a unit test, `the_pgbench_baseline_runs_this_statement` in votes.rs, checks it and
-- prints the statement to paste when they differ).
-- Variables (pgbench -D): tag, users, messages. Run with -M prepared (the store uses prepared
-- statements) and search_path set to the proxy's schema (PGOPTIONS).
\set u random(0, :users - 1)
\set m random(0, :messages - 1)
\set up random(0, 1)
WITH lnk AS (
        SELECT message_id, chat_id, user_id, trace_id, client_request_id, open, created_at,
            updated_at, route
        FROM message_links WHERE message_id = (:tag::text || '-m' || :u::text || '-' || :m::text)::text
    ), ok AS (
        SELECT COALESCE((:tag::text || '-c' || :u::text)::text, chat_id) AS chat_id, route, trace_id FROM lnk
        WHERE user_id = (:tag::text || '-u' || :u::text || '@bench.example')::text
            AND COALESCE((:tag::text || '-c' || :u::text)::text, chat_id) IS NOT NULL
            AND ((:tag::text || '-c' || :u::text)::text IS NULL OR chat_id IS NULL OR chat_id = (:tag::text || '-c' || :u::text)::text)
            AND (NOT false::boolean OR trace_id IS NOT NULL OR client_request_id IS NOT NULL
                OR open)
    ), v AS (
        INSERT INTO votes (message_id, user_id, name, chat_id, value, comment, updated_at, route)
        SELECT (:tag::text || '-m' || :u::text || '-' || :m::text)::text, (:tag::text || '-u' || :u::text || '@bench.example')::text, 'user_feedback'::text, ok.chat_id, (CASE WHEN :up::int = 1 THEN 'true' ELSE 'false' END)::jsonb, NULL::text, now(), ok.route
        FROM ok
        ON CONFLICT (message_id, user_id, name) DO UPDATE SET
            chat_id = excluded.chat_id, value = excluded.value, comment = excluded.comment,
            updated_at = excluded.updated_at, route = excluded.route
        RETURNING true AS written
    ), d AS (
        INSERT INTO deliveries (message_id, user_id, name, chat_id, desired, desired_value,
            desired_comment, version, generation, state, attempts, next_attempt_at,
            enqueued_at, last_error, updated_at, trace_id, lease_until, claims)
        SELECT (:tag::text || '-m' || :u::text || '-' || :m::text)::text, (:tag::text || '-u' || :u::text || '@bench.example')::text, 'user_feedback'::text, ok.chat_id, 'upsert', (CASE WHEN :up::int = 1 THEN 'true' ELSE 'false' END)::jsonb, NULL::text, 1, 0,
            'waiting'::text, CASE WHEN NULL::bigint IS NULL THEN 0 ELSE 1 END,
            now() + 0::bigint * interval '1 millisecond', now(), 'no_experiment_id'::text, now(), ok.trace_id,
            now() + NULL::bigint * interval '1 millisecond',
            CASE WHEN NULL::bigint IS NULL THEN 0 ELSE 1 END
        FROM ok, v
        ON CONFLICT (message_id, user_id, name) DO UPDATE SET
        chat_id = excluded.chat_id, desired = excluded.desired,
        desired_value = excluded.desired_value, desired_comment = excluded.desired_comment,
        version = deliveries.version + 1, state = excluded.state,
        next_attempt_at = excluded.next_attempt_at, enqueued_at = excluded.enqueued_at,
        last_error = excluded.last_error, updated_at = excluded.updated_at, trace_id = COALESCE(deliveries.trace_id, excluded.trace_id),
        attempts = CASE WHEN excluded.lease_until IS NOT NULL AND (deliveries.lease_until IS NULL
            OR deliveries.lease_until <= now()) THEN 1 ELSE 0 END,
        claims = deliveries.claims + CASE WHEN excluded.lease_until IS NOT NULL
            AND (deliveries.lease_until IS NULL OR deliveries.lease_until <= now())
            THEN 1 ELSE 0 END,
        lease_until = CASE WHEN excluded.lease_until IS NOT NULL AND (deliveries.lease_until
            IS NULL OR deliveries.lease_until <= now()) THEN excluded.lease_until
            ELSE deliveries.lease_until END
    RETURNING message_id, user_id, name, chat_id, desired, desired_value, desired_comment, version, assessment_id, generation, trace_id, state, attempts, next_attempt_at, enqueued_at, last_error, updated_at, claims
    )
    SELECT lnk.message_id AS link_message_id, lnk.chat_id AS link_chat_id,
        lnk.user_id AS link_user_id, lnk.trace_id AS link_trace_id,
        lnk.client_request_id AS link_client_request_id, lnk.open AS link_open,
        lnk.created_at AS link_created_at, lnk.updated_at AS link_updated_at,
        lnk.route AS link_route, d.*
    FROM lnk LEFT JOIN d ON true;
