-- Version 1: message links, votes and the delivery outbox.
-- Runs inside one IMMEDIATE transaction. Timestamps are integer milliseconds since the Unix
-- epoch; vote values are JSON text (true, 4.5, "thumbs_up"); booleans are 0/1.

CREATE TABLE IF NOT EXISTS message_links (
    message_id        TEXT    PRIMARY KEY,
    chat_id           TEXT,
    user_id           TEXT    NOT NULL,
    trace_id          TEXT,
    client_request_id TEXT,
    open              INTEGER NOT NULL DEFAULT 1,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS votes (
    message_id TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    chat_id    TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    comment    TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (message_id, user_id, name)
);

-- GET /api/feedback/{chatId}: a user's votes in one chat.
CREATE INDEX IF NOT EXISTS votes_chat_user ON votes (chat_id, user_id);

CREATE TABLE IF NOT EXISTS deliveries (
    message_id      TEXT    NOT NULL,
    user_id         TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    chat_id         TEXT    NOT NULL,
    desired         TEXT    NOT NULL CHECK (desired IN ('upsert', 'delete')),
    desired_value   TEXT,
    desired_comment TEXT,
    version         INTEGER NOT NULL,
    assessment_id   TEXT,
    generation      INTEGER NOT NULL DEFAULT 0,
    trace_id        TEXT,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'waiting', 'done', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    enqueued_at     INTEGER NOT NULL,
    lease_until     INTEGER,
    last_error      TEXT,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (message_id, user_id, name),
    CHECK (desired = 'delete' OR desired_value IS NOT NULL)
);

-- The worker's poll: due pending deliveries, oldest first.
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
