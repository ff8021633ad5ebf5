-- Version 6 (written as version 5 on its branch, renumbered when corrections took 5): what the review surface costs a vote, cut down (issue 15: POST /api/feedback at most
-- 5 % slower with the review objects than without them). The rollup's contents, and what the
-- listing returns and in which order, are unchanged: no backfill of the rollup.
--
-- 1. The listing's index no longer changes on a re-vote. Version 3's `votes_recent` was keyed on
--    `updated_at`, which every vote change rewrites, so no update of a vote could be HOT: each one
--    added entries to all three indexes of `votes`. `updated_minute` is the UTC minute of
--    `updated_at` (a stored generated column, so every writer keeps it right), and the listing
--    index is on it alone: a re-vote within the same minute leaves every index key as it was and
--    is a HOT update when its page has room. `fillfactor = 90` leaves that room on the pages
--    written from now on (and on all of them here: adding the stored column rewrites the table).
--    The listing orders by (`updated_minute`, `updated_at`, key) descending, the same order as
--    before since the minute never decreases with `updated_at`; it sorts within a minute.
--    Adding the column rewrites `votes` under an exclusive lock (about 10 s per million votes).
--
-- 2. The rollup trigger has no WHEN condition any more. Postgres deserializes and compiles a
--    trigger's WHEN expression once per statement, and every vote is its own statement: version
--    4's condition cost more than the trigger call it saved. The same test is now the first
--    statement of the function. The function names its tables with the schema instead of `SET
--    search_path FROM CURRENT` (a SET clause makes every call save and restore the setting), and
--    its statements are plain upserts: a moved vote writes its two rows in one statement, in key
--    order as before (two transactions sharing a shard can wait on each other but never
--    deadlock).
--
-- 3. `vote_rollup` keeps room on its pages (`fillfactor = 50`): the current hour's rows are
--    updated by almost every vote, and an update that finds no room on its page is not HOT
--    (a new primary key entry each time, and a fast-bloating table).

ALTER TABLE votes SET (fillfactor = 90);
ALTER TABLE votes ADD COLUMN IF NOT EXISTS updated_minute timestamptz
    GENERATED ALWAYS AS (date_bin('1 minute', updated_at, timestamptz '1970-01-01 00:00:00+00'))
    STORED;
DROP INDEX IF EXISTS votes_recent;
CREATE INDEX IF NOT EXISTS votes_recent_minute ON votes (updated_minute);
-- The new column has no statistics until the next (auto)analyze, and the listing's plans need
-- them (without, the planner scans the whole range and sorts it).
ANALYZE votes;

ALTER TABLE vote_rollup SET (fillfactor = 50);

DROP TRIGGER IF EXISTS votes_rollup ON votes;
DROP TRIGGER IF EXISTS votes_rollup_change ON votes;
DROP FUNCTION IF EXISTS vote_rollup_apply();

-- The rollup key is version 3's: floor(epoch / 3600), name, COALESCE(route, ''), value.
DO $migration$
BEGIN
    EXECUTE format($function$
CREATE FUNCTION vote_rollup_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    -- The rollup rows to add to: (h1, n1, r1, v1) += (d1, c1), and for a moved vote
    -- (h2, n2, r2, v2) += (d2, c2).
    h1 bigint; n1 text; r1 text; v1 jsonb; d1 int; c1 int;
    h2 bigint; n2 text; r2 text; v2 jsonb; d2 int; c2 int;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        -- An update that changes nothing the rollup counts (same hour, name, route and value,
        -- with or without a comment as before) writes nothing.
        IF OLD.value = NEW.value AND OLD.name = NEW.name
                AND (OLD.comment IS NULL) = (NEW.comment IS NULL)
                AND OLD.route IS NOT DISTINCT FROM NEW.route
                AND date_bin('1 hour', OLD.updated_at, timestamptz '1970-01-01 00:00:00+00')
                    = date_bin('1 hour', NEW.updated_at, timestamptz '1970-01-01 00:00:00+00') THEN
            RETURN NULL;
        END IF;
        h1 := floor(extract(epoch FROM OLD.updated_at) / 3600)::bigint;
        n1 := OLD.name; r1 := COALESCE(OLD.route, ''); v1 := OLD.value;
        d1 := -1; c1 := -(OLD.comment IS NOT NULL)::int;
        h2 := floor(extract(epoch FROM NEW.updated_at) / 3600)::bigint;
        n2 := NEW.name; r2 := COALESCE(NEW.route, ''); v2 := NEW.value;
        d2 := 1; c2 := (NEW.comment IS NOT NULL)::int;
        IF (h1, n1, r1, v1) = (h2, n2, r2, v2) THEN
            -- Only whether it has a comment changed: one row.
            d1 := 0; c1 := c1 + c2;
        ELSE
            -- A moved vote: both rows in one statement, the lower key first.
            IF (h1, n1, r1, v1) < (h2, n2, r2, v2) THEN
                INSERT INTO %1$I.vote_rollup AS r
                    (hour, name, route, value, shard, votes, commented)
                VALUES (h1, n1, r1, v1, (pg_backend_pid() %% 16)::smallint, d1, c1),
                    (h2, n2, r2, v2, (pg_backend_pid() %% 16)::smallint, d2, c2)
                ON CONFLICT (hour, name, route, value, shard) DO UPDATE SET
                    votes = r.votes + excluded.votes,
                    commented = r.commented + excluded.commented;
            ELSE
                INSERT INTO %1$I.vote_rollup AS r
                    (hour, name, route, value, shard, votes, commented)
                VALUES (h2, n2, r2, v2, (pg_backend_pid() %% 16)::smallint, d2, c2),
                    (h1, n1, r1, v1, (pg_backend_pid() %% 16)::smallint, d1, c1)
                ON CONFLICT (hour, name, route, value, shard) DO UPDATE SET
                    votes = r.votes + excluded.votes,
                    commented = r.commented + excluded.commented;
            END IF;
            RETURN NULL;
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        h1 := floor(extract(epoch FROM NEW.updated_at) / 3600)::bigint;
        n1 := NEW.name; r1 := COALESCE(NEW.route, ''); v1 := NEW.value;
        d1 := 1; c1 := (NEW.comment IS NOT NULL)::int;
    ELSE
        h1 := floor(extract(epoch FROM OLD.updated_at) / 3600)::bigint;
        n1 := OLD.name; r1 := COALESCE(OLD.route, ''); v1 := OLD.value;
        d1 := -1; c1 := -(OLD.comment IS NOT NULL)::int;
    END IF;
    INSERT INTO %1$I.vote_rollup AS r (hour, name, route, value, shard, votes, commented)
    VALUES (h1, n1, r1, v1, (pg_backend_pid() %% 16)::smallint, d1, c1)
    ON CONFLICT (hour, name, route, value, shard) DO UPDATE SET
        votes = r.votes + excluded.votes, commented = r.commented + excluded.commented;
    RETURN NULL;
END
$$
$function$, current_schema());
END
$migration$;

CREATE TRIGGER votes_rollup AFTER INSERT OR UPDATE OR DELETE ON votes
    FOR EACH ROW EXECUTE FUNCTION vote_rollup_apply();
