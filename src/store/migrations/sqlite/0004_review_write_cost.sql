-- Version 4: the review rollup costs a vote only when the vote changes what it counts.
--
-- Version 3's update trigger wrote two rollup rows for EVERY update of a vote, including a
-- re-vote that changes nothing the rollup counts: the same value, route and name, with or
-- without a comment as before, within the same hour. Such an update now skips the trigger
-- through its WHEN condition; every other update moves the vote as before. The rollup's
-- contents and meaning are unchanged (no backfill).

DROP TRIGGER IF EXISTS votes_rollup_update;

-- The same key as the rollup's: updated_at / 3600000, name, COALESCE(route, ''), value.
CREATE TRIGGER IF NOT EXISTS votes_rollup_update AFTER UPDATE ON votes
WHEN OLD.updated_at / 3600000 <> NEW.updated_at / 3600000
    OR OLD.name <> NEW.name
    OR COALESCE(OLD.route, '') <> COALESCE(NEW.route, '')
    OR OLD.value <> NEW.value
    OR (OLD.comment IS NULL) <> (NEW.comment IS NULL)
BEGIN
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
