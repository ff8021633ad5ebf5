-- Version 4: the review rollup costs a vote only when the vote changes what it counts.
--
-- Version 3's trigger ran `vote_rollup_apply` (a PL/pgSQL call and an upsert of the rollup) for
-- EVERY update of a vote, including a re-vote that changes nothing the rollup counts: the same
-- value, route and name, with or without a comment as before, within the same hour. Such an
-- update now skips the trigger through its WHEN condition, which Postgres evaluates without
-- calling the function; inserts, retractions and every update that moves a vote to another
-- (hour, name, route, value) or changes whether it has a comment run `vote_rollup_apply` as
-- before. The rollup's contents and meaning are unchanged (no backfill).

DROP TRIGGER IF EXISTS votes_rollup ON votes;
DROP TRIGGER IF EXISTS votes_rollup_change ON votes;

CREATE TRIGGER votes_rollup AFTER INSERT OR DELETE ON votes
    FOR EACH ROW EXECUTE FUNCTION vote_rollup_apply();

-- The same key as vote_rollup_apply's: floor(epoch / 3600), name, COALESCE(route, ''), value.
CREATE TRIGGER votes_rollup_change AFTER UPDATE ON votes
    FOR EACH ROW
    WHEN (floor(extract(epoch FROM OLD.updated_at) / 3600)
            <> floor(extract(epoch FROM NEW.updated_at) / 3600)
        OR OLD.name <> NEW.name
        OR COALESCE(OLD.route, '') <> COALESCE(NEW.route, '')
        OR OLD.value <> NEW.value
        OR (OLD.comment IS NULL) <> (NEW.comment IS NULL))
    EXECUTE FUNCTION vote_rollup_apply();
