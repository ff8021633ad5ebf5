-- The SQLite twin of generate-postgres.sql (same shapes and proportions).
BEGIN IMMEDIATE;
CREATE TEMP TABLE gen AS
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 1000000)
SELECT i,
    'bench-m' || i AS message_id,
    'bench-u' || (i % 100000) || '@bench.example' AS user_id,
    'bench-c' || (i / 4) AS chat_id,
    CASE WHEN abs(random() % 1000) < 700 THEN 'user_feedback' ELSE 'rating' END AS name,
    abs(random() % 1000) / 1000.0 AS r,
    CASE WHEN abs(random() % 1000) < 100 THEN 'comment ' || i END AS comment,
    CASE WHEN abs(random() % 1000) < 800 THEN '/invocations' ELSE '/responses' END AS route,
    CAST(strftime('%s', 'now') AS INTEGER) * 1000 - abs(random() % 7776000000) AS at
FROM s;
INSERT INTO message_links (message_id, chat_id, user_id, trace_id, open, route, created_at,
    updated_at)
SELECT message_id, chat_id, user_id, 'tr-' || lower(hex(randomblob(16))), 0, route, at, at FROM gen;
INSERT INTO votes (message_id, user_id, name, chat_id, value, comment, updated_at, route)
SELECT message_id, user_id, name, chat_id,
    CASE WHEN name = 'rating' THEN printf('%.1f', 1 + CAST(r * 5 AS INTEGER))
        WHEN r < 0.75 THEN 'true' ELSE 'false' END,
    comment, at, route
FROM gen;
INSERT INTO deliveries (message_id, user_id, name, chat_id, desired, desired_value, version,
    trace_id, state, next_attempt_at, enqueued_at, updated_at)
SELECT v.message_id, v.user_id, v.name, v.chat_id, 'upsert', v.value, 1, l.trace_id, 'done',
    v.updated_at, v.updated_at, v.updated_at
FROM votes AS v JOIN message_links AS l ON l.message_id = v.message_id;
COMMIT;
ANALYZE;
