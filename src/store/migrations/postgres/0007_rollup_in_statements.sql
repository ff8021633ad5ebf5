-- Version 7: the store's own vote statements keep `vote_rollup`; the row trigger is gone
-- (issue 15: POST /api/feedback at most 5 % slower with the review surface than without it).
--
-- A row trigger costs every vote an AFTER-trigger event and a PL/pgSQL call, whether or not the
-- rollup changes (about 130 k of a vote's 600 k backend instructions at version 6). The three
-- statements that change `votes` (`store/postgres/votes.rs`: the one-statement vote, the general
-- vote upsert and the retraction) now write the rollup themselves, as data-modifying CTEs of the
-- same statement: they lock the vote's old row (`FOR UPDATE`), upsert or delete it, and add the
-- difference to the rollup in one insert, in key order (two statements sharing a shard can wait
-- on each other but never deadlock), writing nothing when nothing the rollup counts changed.
-- The rollup's key, sharding and contents are unchanged: no backfill.
--
-- What this asks of other writers: a program that changes `votes` by other means must keep the
-- rollup itself, or call `vote_rollup_rebuild()` afterwards. That includes a binary older than
-- version 7 still serving during a rolling upgrade (it relies on the trigger): once every
-- replica runs version 7, `SELECT feedback_proxy.vote_rollup_rebuild();` (with your schema)
-- recounts the rollup from `votes` (docs/deploy.md, "Upgrading").

DROP TRIGGER IF EXISTS votes_rollup ON votes;
DROP FUNCTION IF EXISTS vote_rollup_apply();

-- Recounts the whole rollup from `votes`, atomically (readers see the old or the new counts),
-- and returns the number of rollup rows. It locks `votes` against writes while it counts
-- (SHARE mode: votes wait, reads do not), about a second per million votes.
DO $migration$
BEGIN
    EXECUTE format($function$
CREATE OR REPLACE FUNCTION vote_rollup_rebuild() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    LOCK TABLE %1$I.votes IN SHARE MODE;
    LOCK TABLE %1$I.vote_rollup IN EXCLUSIVE MODE;
    DELETE FROM %1$I.vote_rollup;
    INSERT INTO %1$I.vote_rollup (hour, name, route, value, shard, votes, commented)
    SELECT floor(extract(epoch FROM updated_at) / 3600)::bigint, name, COALESCE(route, ''),
        value, 0, count(*), count(comment)
    FROM %1$I.votes GROUP BY 1, 2, 3, 4;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$
$function$, current_schema());
END
$migration$;
