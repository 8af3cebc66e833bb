-- Admitting a new task in one round trip (issue 15's dispatch latency). The admission was a transaction of five
-- statements from the relay (BEGIN, the locks, the counts, the INSERT, COMMIT), each a round trip on every
-- submission's way. This function does the same in one call; called on its own it is its own transaction, so
-- the locks it takes are held until the task it wrote has committed.
--
-- The locks are the ones the relay took before this migration, with the same keys, so a node still running the
-- older binary during a rolling upgrade and a node calling this function exclude each other. Both keys come from
-- the database's own hash, the same on every node whatever its binary, and are taken in the order of their
-- keys, so two admissions cannot each hold one and wait for the other (were they to, PostgreSQL breaks the
-- deadlock and the relay runs the admission again). In READ COMMITTED each statement of a VOLATILE function sees
-- what committed before that statement began, so the counts, read after the locks, see every admission that
-- held them before.
--
-- The limits are the relay's `TaskLimits::refuses`, and "dispatched" is `TaskRecord::is_dispatched`: a
-- `dispatched_at`, or a state of running or waiting for approval (records from before `dispatched_at`
-- existed). The store contract suite runs the same admission cases against this and the embedded store.
--
-- Outcome: 'admitted'; 'too_many_tasks' with the person's open tasks; 'queue_full' with the tasks waiting in
-- the agent's queue; 'conflict' when a task with this id exists (nothing is written).
CREATE FUNCTION ct_admit_task(
    p_id text, p_agent bytea, p_requester text, p_session text, p_is_open boolean, p_ord bigint,
    p_updated_at bigint, p_output_bytes bigint, p_body bytea,
    p_open_per_user bigint, p_running_per_agent bigint, p_queued_per_agent bigint,
    OUT outcome text, OUT n bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_running bigint;
    v_queued bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(least(k.u, k.a)), pg_advisory_xact_lock(greatest(k.u, k.a))
    FROM (SELECT hashtextextended('ct-relay admission of user ' || p_requester, 0) AS u,
                 hashtextextended('ct-relay admission on agent ' || encode(p_agent, 'hex'), 0) AS a) k;

    SELECT count(*) INTO n FROM ct_tasks WHERE requester = p_requester AND is_open;
    IF n >= p_open_per_user THEN
        outcome := 'too_many_tasks';
        RETURN;
    END IF;

    SELECT count(*) FILTER (WHERE d.dispatched), count(*) FILTER (WHERE NOT d.dispatched)
    INTO v_running, v_queued
    FROM (SELECT b ->> 'dispatched_at' IS NOT NULL OR b ->> 'state' IN ('running', 'waiting_approval')
                 AS dispatched
          FROM (SELECT convert_from(body, 'UTF8')::jsonb AS b
                FROM ct_tasks WHERE agent = p_agent AND is_open) t) d;
    IF (v_queued > 0 OR v_running >= p_running_per_agent) AND v_queued >= p_queued_per_agent THEN
        outcome := 'queue_full';
        n := v_queued;
        RETURN;
    END IF;

    INSERT INTO ct_tasks (id, agent, requester, session, is_open, ord, updated_at, output_bytes, body)
    VALUES (p_id, p_agent, p_requester, p_session, p_is_open, p_ord, p_updated_at, p_output_bytes, p_body)
    ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        outcome := 'conflict';
        n := 0;
        RETURN;
    END IF;
    outcome := 'admitted';
    n := 0;
END
$$;
