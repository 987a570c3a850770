-- pgbridge 004: one ticker among many bridges. Replicas of a bridge used to take a tick each when woken,
-- and every writer's wake-up signalled every one of them, so the database's work per change grew with
-- the number of replicas. Now one bridge at a time holds the `ticker` lease: it alone listens for
-- writers' wake-ups and takes ticks, and once a tick is durable it announces it, once, on the `ticks`
-- channel, which the other bridges follow. The lease is a time (held until `until`, renewed well before),
-- so a holder that dies or freezes loses it within a second and another bridge takes over; two bridges
-- ticking at once stays correct (ticks are serialized), it only costs more.
--
-- Apply by hand with `psql -v ON_ERROR_STOP=1 -f sql/004_ticker.sql` (after 003), or with
-- `pgbridge migrate`. Safe to apply more than once; refuses to run over a newer schema. Bridges of 0.3
-- keep working over it (each of them ticks, as before).

BEGIN;
SET LOCAL client_min_messages = warning;

DO $$
DECLARE
    installed integer;
BEGIN
    IF to_regclass('pgbridge.migrations') IS NOT NULL THEN
        EXECUTE 'SELECT max(version) FROM pgbridge.migrations' INTO installed;
    END IF;
    IF installed IS NULL OR installed < 3 THEN
        RAISE EXCEPTION 'pgbridge migration 003 is not applied'
            USING HINT = 'Apply sql/001_change_log.sql to sql/003_wake_and_snapshots.sql first, or run `pgbridge migrate`.';
    END IF;
    IF installed > 4 THEN
        RAISE EXCEPTION 'pgbridge schema version % is installed; 004 is older and was not applied', installed
            USING HINT = 'Nothing to do: `pgbridge migrate` applies only the migrations a database lacks.';
    END IF;
END
$$;

-- Bridges may already update this table (grant_bridge): the ticker lease needs no new privilege.
ALTER TABLE pgbridge.leases ADD COLUMN IF NOT EXISTS holder text, ADD COLUMN IF NOT EXISTS until timestamptz;
INSERT INTO pgbridge.leases (name) VALUES ('ticker') ON CONFLICT DO NOTHING;
COMMENT ON TABLE pgbridge.leases IS
    'prune and flush: row locks, held for one short transaction. ticker: the bridge (holder) that takes '
    'ticks until `until`; it renews the lease long before, and another bridge takes it once it lapses.';

ALTER TABLE pgbridge.channels DROP CONSTRAINT IF EXISTS channels_purpose_check,
    ADD CONSTRAINT channels_purpose_check CHECK (purpose IN ('wake', 'publications', 'ticks'));
COMMENT ON TABLE pgbridge.channels IS
    'The NOTIFY channels of pgbridge: wake (a statement changed a published table), publications (the '
    'published tables changed) and ticks (the ticker took a tick: "<n> <when>"). Random names, known only '
    'to roles that may read this table.';
INSERT INTO pgbridge.channels (purpose, name)
VALUES ('ticks', 'pgbridge_ticks_' || replace(gen_random_uuid()::text, '-', ''))
ON CONFLICT DO NOTHING;

INSERT INTO pgbridge.migrations (version, name) VALUES (4, '004_ticker')
ON CONFLICT (version) DO NOTHING;

COMMIT;
