-- pgbridge 004: one ticker among many bridges. Replicas of a bridge used to take a tick each when woken,
-- and every writer's wake-up signalled every one of them, so the database's work per change grew with
-- the number of replicas. Now one bridge at a time holds the `ticker` lease: it alone listens for
-- writers' wake-ups and takes ticks, and once a tick is durable it announces it: it records it as
-- `announced` and lets go of an advisory lock that the other bridges wait on (await_tick_v4). They
-- LISTEN to nothing, since PostgreSQL signals every listening backend of a database at every commit
-- that notifies, whatever the channel. The lease is a time (held until `until`, renewed well before),
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

-- Bridges may already read and update this table (grant_bridge): the lease needs no new privilege.
ALTER TABLE pgbridge.leases ADD COLUMN IF NOT EXISTS holder text, ADD COLUMN IF NOT EXISTS until timestamptz,
    ADD COLUMN IF NOT EXISTS announced bigint, ADD COLUMN IF NOT EXISTS key integer;
INSERT INTO pgbridge.leases (name, key) VALUES ('ticker', floor(random() * 2147483647)::integer)
ON CONFLICT (name) DO UPDATE SET key = excluded.key WHERE leases.key IS NULL;
COMMENT ON TABLE pgbridge.leases IS
    'prune and flush: row locks, held for one short transaction. ticker: the bridge (holder) that takes '
    'ticks until `until`, the last tick it announced, and the advisory lock class (key, secret) it holds '
    'the lock (key, announced + 1) of, which the others wait on.';

-- A bridge that follows the ticker waits here, at most `wait_ms` milliseconds, for a tick after `after`
-- to be announced; it gets the newest announced tick and when it was taken (n may still be `after`, or
-- NULL before any announcement). `waited` is true when it waited for the ticker: false when a newer tick
-- was there already, or when nobody holds the lock it would wait on (no ticker: the caller waits before
-- it asks again). Waiting is taking that lock, shared: no
-- notification, no polling. Its class is secret, so no other role can hold the followers up.
CREATE OR REPLACE FUNCTION pgbridge.await_tick_v4(after bigint, wait_ms integer,
                                                  OUT n bigint, OUT at timestamptz, OUT waited boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lock_class integer;
BEGIN
    SELECT l.announced, l.key INTO n, lock_class FROM pgbridge.leases l WHERE l.name = 'ticker';
    waited := false;
    IF n <= after THEN
        -- Free: the ticker has just moved on (it takes the next lock before it records a tick), or
        -- nobody ticks. Either way the announced tick is read again.
        IF NOT pg_try_advisory_xact_lock_shared(lock_class, ((n + 1) % 2147483648)::integer) THEN
            waited := true;
            PERFORM set_config('lock_timeout', wait_ms || 'ms', true);
            BEGIN
                PERFORM pg_advisory_xact_lock_shared(lock_class, ((n + 1) % 2147483648)::integer);
            EXCEPTION WHEN lock_not_available THEN
                NULL;
            END;
        END IF;
        SELECT l.announced INTO n FROM pgbridge.leases l WHERE l.name = 'ticker';
    END IF;
    SELECT t.at INTO at FROM pgbridge.ticks t WHERE t.n = await_tick_v4.n;
END
$$;

-- What a bridge needs when it connects as a role of its own rather than as this schema's owner.
CREATE OR REPLACE FUNCTION pgbridge.grant_bridge(bridge regrole) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA pgbridge TO %s', bridge);
    EXECUTE format('GRANT SELECT ON pgbridge.changes, pgbridge.ticks, pgbridge.publications, pgbridge.migrations, '
                   'pgbridge.channels TO %s', bridge);
    EXECUTE format('GRANT DELETE ON pgbridge.changes, pgbridge.ticks TO %s', bridge);  -- pruning
    EXECUTE format('GRANT SELECT, UPDATE ON pgbridge.leases TO %s', bridge);  -- one pruner, one ticker
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgbridge.tick_v2(), pgbridge.tick_v3(boolean), pgbridge.flush_v2(), '
                   'pgbridge.snapshot_v3(text, refcursor), pgbridge.await_tick_v4(bigint, integer), '
                   'pgbridge.log_format(), pgbridge.iso(timestamptz) TO %s', bridge);
END
$$;

-- Bridges that were granted 003's rights get 004's.
DO $$
DECLARE
    bridge regrole;
BEGIN
    FOR bridge IN SELECT DISTINCT a.grantee::regrole FROM pg_proc p, aclexplode(p.proacl) a
                  WHERE p.oid = 'pgbridge.tick_v3(boolean)'::regprocedure AND a.grantee NOT IN (0, p.proowner) LOOP
        PERFORM pgbridge.grant_bridge(bridge);
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION pgbridge.await_tick_v4(bigint, integer) FROM PUBLIC;

INSERT INTO pgbridge.migrations (version, name) VALUES (4, '004_ticker')
ON CONFLICT (version) DO NOTHING;

COMMIT;
