-- Version 3: the review surface (GET /api/review/summary and /api/review/feedback).
--
-- `route` is the agent route a message was streamed through (the route's path, e.g.
-- `/invocations`); a vote copies it from its message's link. NULL for rows written before.
--
-- `vote_rollup` counts the CURRENT votes per hour (UTC, `updated_at / 3600000`), name, route and
-- value, kept in step with `votes` by the triggers below in the same transaction as every vote
-- change: an insert adds 1, a changed vote moves 1 from its old (hour, value) to its new one, a
-- retraction takes 1 away. A summary then reads a few thousand rollup rows instead of every
-- vote in its range (1,000,000 votes over 90 days: 30-day summaries stay in milliseconds).

ALTER TABLE message_links ADD COLUMN route TEXT;
ALTER TABLE votes ADD COLUMN route TEXT;

-- The feedback listing: newest first, keyset (updated_at, key) descending.
CREATE INDEX IF NOT EXISTS votes_recent ON votes (updated_at, message_id, user_id, name);

CREATE TABLE IF NOT EXISTS vote_rollup (
    hour      INTEGER NOT NULL,
    name      TEXT    NOT NULL,
    route     TEXT    NOT NULL, -- '' when unknown
    value     TEXT    NOT NULL, -- the vote value as JSON text, as in votes.value
    votes     INTEGER NOT NULL,
    commented INTEGER NOT NULL,
    PRIMARY KEY (hour, name, route, value)
) WITHOUT ROWID;

INSERT INTO vote_rollup (hour, name, route, value, votes, commented)
SELECT updated_at / 3600000, name, COALESCE(route, ''), value, count(*), count(comment)
FROM votes GROUP BY 1, 2, 3, 4;

CREATE TRIGGER IF NOT EXISTS votes_rollup_insert AFTER INSERT ON votes BEGIN
    INSERT INTO vote_rollup (hour, name, route, value, votes, commented)
    VALUES (NEW.updated_at / 3600000, NEW.name, COALESCE(NEW.route, ''), NEW.value, 1,
        NEW.comment IS NOT NULL)
    ON CONFLICT (hour, name, route, value) DO UPDATE SET
        votes = votes + 1, commented = commented + excluded.commented;
END;

CREATE TRIGGER IF NOT EXISTS votes_rollup_update AFTER UPDATE ON votes BEGIN
    INSERT INTO vote_rollup (hour, name, route, value, votes, commented)
    VALUES (OLD.updated_at / 3600000, OLD.name, COALESCE(OLD.route, ''), OLD.value, -1,
        -(OLD.comment IS NOT NULL))
    ON CONFLICT (hour, name, route, value) DO UPDATE SET
        votes = votes - 1, commented = commented + excluded.commented;
    INSERT INTO vote_rollup (hour, name, route, value, votes, commented)
    VALUES (NEW.updated_at / 3600000, NEW.name, COALESCE(NEW.route, ''), NEW.value, 1,
        NEW.comment IS NOT NULL)
    ON CONFLICT (hour, name, route, value) DO UPDATE SET
        votes = votes + 1, commented = commented + excluded.commented;
END;

CREATE TRIGGER IF NOT EXISTS votes_rollup_delete AFTER DELETE ON votes BEGIN
    INSERT INTO vote_rollup (hour, name, route, value, votes, commented)
    VALUES (OLD.updated_at / 3600000, OLD.name, COALESCE(OLD.route, ''), OLD.value, -1,
        -(OLD.comment IS NOT NULL))
    ON CONFLICT (hour, name, route, value) DO UPDATE SET
        votes = votes - 1, commented = commented + excluded.commented;
END;
