-- Version 1: message links, votes and the delivery outbox.
-- Runs inside one transaction with search_path set to the proxy's schema, so names are
-- unqualified. Timestamps are timestamptz; vote values are JSON (true, 4.5, "thumbs_up").

CREATE TABLE IF NOT EXISTS message_links (
    message_id        text        PRIMARY KEY,
    chat_id           text,
    user_id           text        NOT NULL,
    trace_id          text,
    client_request_id text,
    open              boolean     NOT NULL DEFAULT true,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS votes (
    message_id text        NOT NULL,
    user_id    text        NOT NULL,
    name       text        NOT NULL,
    chat_id    text        NOT NULL,
    value      jsonb       NOT NULL,
    comment    text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, user_id, name)
);

-- GET /api/feedback/{chatId}: a user's votes in one chat.
CREATE INDEX IF NOT EXISTS votes_chat_user ON votes (chat_id, user_id);

CREATE TABLE IF NOT EXISTS deliveries (
    message_id      text        NOT NULL,
    user_id         text        NOT NULL,
    name            text        NOT NULL,
    chat_id         text        NOT NULL,
    desired         text        NOT NULL CHECK (desired IN ('upsert', 'delete')),
    desired_value   jsonb,
    desired_comment text,
    version         bigint      NOT NULL,
    assessment_id   text,
    generation      bigint      NOT NULL DEFAULT 0,
    trace_id        text,
    state           text        NOT NULL CHECK (state IN ('pending', 'waiting', 'done', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    enqueued_at     timestamptz NOT NULL,
    lease_until     timestamptz,
    last_error      text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, user_id, name),
    CHECK (desired = 'delete' OR desired_value IS NOT NULL)
);

-- The workers' poll: due pending deliveries, oldest first.
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
