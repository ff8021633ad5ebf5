-- 1,000,000 votes across 100,000 users over the 90 days before now, with their message links
-- and (delivered) outbox rows, for the review benchmark (bench/review/run.sh). Runs in the
-- proxy's schema after `feedback-proxy migrate`; the vote trigger fills vote_rollup as it goes.
-- 70 % thumbs (75 % up), 30 % ratings 1-5; 10 % with a comment; 80 % on /invocations.
\set n 1000000
BEGIN;
CREATE TEMP TABLE gen AS
SELECT i,
    'bench-m' || i AS message_id,
    'bench-u' || (i % 100000) || '@bench.example' AS user_id,
    'bench-c' || (i / 4) AS chat_id,
    CASE WHEN random() < 0.7 THEN 'user_feedback' ELSE 'rating' END AS name,
    random() AS r,
    CASE WHEN random() < 0.1 THEN 'comment ' || i END AS comment,
    CASE WHEN random() < 0.8 THEN '/invocations' ELSE '/responses' END AS route,
    now() - random() * interval '90 days' AS at
FROM generate_series(1, :n) AS i;
INSERT INTO message_links (message_id, chat_id, user_id, trace_id, open, route, created_at,
    updated_at)
SELECT message_id, chat_id, user_id, 'tr-' || md5(message_id), false, route, at, at FROM gen;
INSERT INTO votes (message_id, user_id, name, chat_id, value, comment, updated_at, route)
SELECT message_id, user_id, name, chat_id,
    CASE WHEN name = 'rating' THEN to_jsonb((1 + floor(r * 5))::float8)
        ELSE to_jsonb(r < 0.75) END,
    comment, at, route
FROM gen;
INSERT INTO deliveries (message_id, user_id, name, chat_id, desired, desired_value, version,
    trace_id, state, next_attempt_at, enqueued_at, updated_at)
SELECT v.message_id, v.user_id, v.name, v.chat_id, 'upsert', v.value, 1, 'tr-' || md5(v.message_id),
    'done', v.updated_at, v.updated_at, v.updated_at
FROM votes AS v;
COMMIT;
-- One transaction wrote every rollup row about a hundred times: none of those versions could be
-- pruned while it ran (89 MB for 30,000 rows). A store filled vote by vote keeps it small (HOT
-- updates, pruning, autovacuum); so does this.
VACUUM FULL vote_rollup;
ANALYZE;
