-- Scenario 5's SQL baseline: the statements one `POST /api/feedback` runs against the Postgres
-- store when MLflow is not configured, statement for statement: the handler's link read
-- (src/store/postgres/links.rs get_link), then upsert_vote's transaction
-- (src/store/postgres/votes.rs) for a vote held `waiting` (reason no_experiment_id: no
-- advisory lock, no link check), with the same key distribution as bench/wrk/feedback.lua.
-- Variables (pgbench -D): tag, users, messages. Run with -M prepared (the store uses prepared
-- statements) and search_path set to the proxy's schema (PGOPTIONS).
\set u random(0, :users - 1)
\set m random(0, :messages - 1)
\set up random(0, 1)
SELECT message_id, chat_id, user_id, trace_id, client_request_id, open, created_at, updated_at
  FROM message_links WHERE message_id = :tag::text || '-m' || :u::text || '-' || :m::text;
BEGIN;
INSERT INTO votes (message_id, user_id, name, chat_id, value, comment, updated_at)
  VALUES (:tag::text || '-m' || :u::text || '-' || :m::text,
          :tag::text || '-u' || :u::text || '@bench.example',
          'user_feedback', :tag::text || '-c' || :u::text,
          (CASE WHEN :up::int = 1 THEN 'true' ELSE 'false' END)::jsonb, NULL, now())
  ON CONFLICT (message_id, user_id, name) DO UPDATE SET
    chat_id = excluded.chat_id, value = excluded.value, comment = excluded.comment,
    updated_at = excluded.updated_at;
INSERT INTO deliveries (message_id, user_id, name, chat_id, desired, desired_value,
    desired_comment, version, generation, state, attempts, next_attempt_at, enqueued_at,
    last_error, updated_at)
  VALUES (:tag::text || '-m' || :u::text || '-' || :m::text,
          :tag::text || '-u' || :u::text || '@bench.example',
          'user_feedback', :tag::text || '-c' || :u::text, 'upsert',
          (CASE WHEN :up::int = 1 THEN 'true' ELSE 'false' END)::jsonb, NULL, 1, 0,
          'waiting', 0, now(), now(),
          'no_experiment_id', now())
  ON CONFLICT (message_id, user_id, name) DO UPDATE SET
    chat_id = excluded.chat_id, desired = excluded.desired,
    desired_value = excluded.desired_value, desired_comment = excluded.desired_comment,
    version = deliveries.version + 1, state = excluded.state, attempts = 0,
    next_attempt_at = excluded.next_attempt_at, enqueued_at = excluded.enqueued_at,
    last_error = excluded.last_error, updated_at = excluded.updated_at
  RETURNING message_id, user_id, name, chat_id, desired, desired_value, desired_comment, version,
    assessment_id, generation, trace_id, state, attempts, next_attempt_at, enqueued_at,
    last_error, updated_at;
END;
