-- Version 3: the review surface (GET /api/review/summary and /api/review/feedback).
--
-- `route` is the agent route a message was streamed through (the route's path, e.g.
-- `/invocations`); a vote copies it from its message's link. NULL for rows written before.
--
-- `vote_rollup` counts the CURRENT votes per hour (UTC), name, route and value, kept in step
-- with `votes` by the trigger below, in the same transaction as every vote change: an insert
-- adds 1, a changed vote moves 1 from its old (hour, value) to its new one, a retraction takes 1
-- away. A summary then reads a few thousand rollup rows instead of every vote in its range.
--
-- Concurrency: every row is split into 16 shards by the writing backend's pid, so concurrent
-- vote transactions (one per pooled connection) do not queue on the lock of one hot row (all
-- the thumbs-up of this hour); a summary sums the shards. The two rows a changed vote touches
-- are written by one statement in key order, so two transactions sharing a shard can wait on
-- each other but never deadlock. Binaries at version 2 keep working against this schema (they
-- leave `route` NULL; the trigger keeps the rollup right for their writes too).

ALTER TABLE message_links ADD COLUMN IF NOT EXISTS route text;
ALTER TABLE votes ADD COLUMN IF NOT EXISTS route text;

-- The feedback listing: newest first, keyset (updated_at, key) descending.
CREATE INDEX IF NOT EXISTS votes_recent ON votes (updated_at, message_id, user_id, name);

CREATE TABLE IF NOT EXISTS vote_rollup (
    hour      bigint   NOT NULL, -- hours since the Unix epoch (UTC)
    name      text     NOT NULL,
    route     text     NOT NULL, -- '' when unknown
    value     jsonb    NOT NULL,
    shard     smallint NOT NULL,
    votes     bigint   NOT NULL,
    commented bigint   NOT NULL,
    PRIMARY KEY (hour, name, route, value, shard)
);

INSERT INTO vote_rollup (hour, name, route, value, shard, votes, commented)
SELECT floor(extract(epoch FROM updated_at) / 3600)::bigint, name, COALESCE(route, ''), value, 0,
    count(*), count(comment)
FROM votes GROUP BY 1, 2, 3, 4
ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION vote_rollup_apply() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO vote_rollup AS r (hour, name, route, value, shard, votes, commented)
    SELECT d.hour, d.name, d.route, d.value, (pg_backend_pid() % 16)::smallint,
        sum(d.votes), sum(d.commented)
    FROM (
        SELECT floor(extract(epoch FROM OLD.updated_at) / 3600)::bigint AS hour, OLD.name AS name,
            COALESCE(OLD.route, '') AS route, OLD.value AS value, -1 AS votes,
            -(OLD.comment IS NOT NULL)::int AS commented
        WHERE TG_OP <> 'INSERT'
        UNION ALL
        SELECT floor(extract(epoch FROM NEW.updated_at) / 3600)::bigint, NEW.name,
            COALESCE(NEW.route, ''), NEW.value, 1, (NEW.comment IS NOT NULL)::int
        WHERE TG_OP <> 'DELETE'
    ) AS d
    GROUP BY d.hour, d.name, d.route, d.value
    ORDER BY d.hour, d.name, d.route, d.value
    ON CONFLICT (hour, name, route, value, shard) DO UPDATE SET
        votes = r.votes + excluded.votes, commented = r.commented + excluded.commented;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS votes_rollup ON votes;
CREATE TRIGGER votes_rollup AFTER INSERT OR UPDATE OR DELETE ON votes
    FOR EACH ROW EXECUTE FUNCTION vote_rollup_apply();
