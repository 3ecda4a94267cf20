-- np_ledger_write updates orders one row at a time, by key. Its UPDATE joined the updates
-- (jsonb_to_recordset, which the planner always guesses at 100 rows) to order_ledger, and from a
-- few thousand orders in the table a hash join over all of them looked cheaper than 100 key
-- lookups: every write then read the whole table, and a 30-minute soak saw tick -> ack p50 creep
-- from 8 to 13 ms over 9,000 orders. A loop of key lookups does not depend on the statistics.
-- (The function text is 0006's with that one statement changed.)

CREATE OR REPLACE FUNCTION np_ledger_write(p_orders jsonb, p_children jsonb, p_updates jsonb, p_events jsonb,
                                p_fills jsonb, p_brackets jsonb, p_risk jsonb)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    skipped uuid[] := '{}';
    conflicts text[] := '{}';
    more_skipped uuid[];
    more_conflicts text[];
    rows jsonb;
    upd record;
BEGIN
    FOR rows IN SELECT unnest(ARRAY[p_orders, p_children]) LOOP
        CONTINUE WHEN rows IS NULL;
        WITH src AS (
            SELECT * FROM jsonb_to_recordset(rows) AS x(
                internal_id uuid, request_id text, client_tag text, exchange_id text, token text,
                exchange_segment text, trading_symbol text, transaction_type text, order_type text,
                product text, quantity int, price numeric, trigger_price numeric, status text,
                filled_qty int, avg_price numeric, strategy_id text, parent_id uuid, bracket_id uuid,
                broker text, purpose text, sliced bool, cancel_requested bool, reason text,
                raw_response jsonb, trading_day date, created_at timestamptz, updated_at timestamptz)
        ), todo AS (
            SELECT * FROM src WHERE parent_id IS NULL OR NOT (parent_id = ANY (skipped))
        ), ins AS (
            INSERT INTO order_ledger (internal_id, request_id, client_tag, exchange_id, token,
                exchange_segment, trading_symbol, transaction_type, order_type, product, quantity,
                price, trigger_price, status, filled_qty, avg_price, strategy_id, parent_id,
                bracket_id, broker, purpose, sliced, cancel_requested, reason, raw_response,
                trading_day, created_at, updated_at)
            SELECT internal_id, request_id, client_tag, exchange_id, token, exchange_segment,
                trading_symbol, transaction_type, order_type, product, quantity, price, trigger_price,
                status, filled_qty, avg_price, strategy_id, parent_id, bracket_id, broker, purpose,
                sliced, cancel_requested, reason, raw_response, trading_day, created_at, updated_at
            FROM todo
            ON CONFLICT (request_id) DO NOTHING
            RETURNING internal_id
        )
        SELECT coalesce(array_agg(s.internal_id) FILTER (WHERE i.internal_id IS NULL), '{}'),
               coalesce(array_agg(s.request_id) FILTER (WHERE i.internal_id IS NULL
                                                       AND (s.parent_id IS NULL
                                                            OR NOT (s.parent_id = ANY (skipped)))), '{}')
          INTO more_skipped, more_conflicts
          FROM src s LEFT JOIN ins i ON i.internal_id = s.internal_id;
        skipped := skipped || more_skipped;
        conflicts := conflicts || more_conflicts;
    END LOOP;

    IF p_updates IS NOT NULL THEN
        -- one UPDATE a row, by key: a join with jsonb_to_recordset (guessed at 100 rows) chose a
        -- hash join over the whole table for a day of a few thousand orders
        FOR upd IN SELECT * FROM jsonb_to_recordset(p_updates) AS v(
                       internal_id uuid, exchange_id text, quantity int, price numeric, trigger_price numeric,
                       status text, filled_qty int, avg_price numeric, cancel_requested bool, reason text,
                       raw_response jsonb, updated_at timestamptz) LOOP
            CONTINUE WHEN upd.internal_id = ANY (skipped);
            UPDATE order_ledger AS t
               SET exchange_id = upd.exchange_id, quantity = upd.quantity, price = upd.price,
                   trigger_price = upd.trigger_price, status = upd.status, filled_qty = upd.filled_qty,
                   avg_price = upd.avg_price, cancel_requested = upd.cancel_requested, reason = upd.reason,
                   raw_response = coalesce(upd.raw_response, t.raw_response), updated_at = upd.updated_at
             WHERE t.internal_id = upd.internal_id;
        END LOOP;
    END IF;

    IF p_events IS NOT NULL THEN
        INSERT INTO order_events (order_id, ts, kind, from_status, to_status, payload)
        SELECT order_id, ts, kind, from_status, to_status, payload
          FROM jsonb_to_recordset(p_events) AS e(order_id uuid, ts timestamptz, kind text,
                                                 from_status text, to_status text, payload jsonb)
         WHERE NOT (order_id = ANY (skipped));
    END IF;

    IF p_fills IS NOT NULL THEN
        INSERT INTO fills (trade_id, broker, trading_day, order_id, exchange_id, strategy_id, token,
                           exchange_segment, trading_symbol, transaction_type, quantity, price, ts, raw)
        SELECT trade_id, broker, trading_day, order_id, exchange_id, strategy_id, token, exchange_segment,
               trading_symbol, transaction_type, quantity, price, ts, raw
          FROM jsonb_to_recordset(p_fills) AS f(trade_id text, broker text, trading_day date, order_id uuid,
                   exchange_id text, strategy_id text, token text, exchange_segment text,
                   trading_symbol text, transaction_type text, quantity int, price numeric,
                   ts timestamptz, raw jsonb)
         WHERE NOT (order_id = ANY (skipped))
        ON CONFLICT (broker, trading_day, exchange_segment, trade_id) DO NOTHING;
    END IF;

    IF p_brackets IS NOT NULL THEN
        INSERT INTO brackets (bracket_id, entry_id, strategy_id, token, exchange_segment, trading_symbol,
                              transaction_type, product, stop_loss, stop_limit, target, state,
                              entry_filled, exit_filled, reason, trail_points, trail_pct, trail_best,
                              to_cost, stop_pct, trading_day, created_at, updated_at)
        SELECT bracket_id, entry_id, strategy_id, token, exchange_segment, trading_symbol,
               transaction_type, product, stop_loss, stop_limit, target, state, entry_filled,
               exit_filled, reason, trail_points, trail_pct, trail_best, to_cost, stop_pct, trading_day,
               created_at, updated_at
          FROM jsonb_to_recordset(p_brackets) AS b(bracket_id uuid, entry_id uuid, strategy_id text,
                   token text, exchange_segment text, trading_symbol text, transaction_type text,
                   product text, stop_loss numeric, stop_limit numeric, target numeric, state text,
                   entry_filled int, exit_filled int, reason text, trail_points numeric,
                   trail_pct numeric, trail_best numeric, to_cost bool, stop_pct numeric, trading_day date,
                   created_at timestamptz, updated_at timestamptz)
         WHERE NOT (entry_id = ANY (skipped))
        ON CONFLICT (bracket_id) DO UPDATE
           SET state = EXCLUDED.state, stop_loss = EXCLUDED.stop_loss, stop_limit = EXCLUDED.stop_limit,
               entry_filled = EXCLUDED.entry_filled, exit_filled = EXCLUDED.exit_filled,
               reason = EXCLUDED.reason, trail_best = EXCLUDED.trail_best, stop_pct = EXCLUDED.stop_pct,
               updated_at = EXCLUDED.updated_at;
    END IF;

    IF p_risk IS NOT NULL THEN
        INSERT INTO risk_events (ts, trading_day, event, reason, source, request_id, data)
        SELECT ts, trading_day, event, reason, source, request_id, data
          FROM jsonb_to_recordset(p_risk) AS r(ts timestamptz, trading_day date, event text, reason text,
                                               source text, request_id text, data jsonb)
        ON CONFLICT (request_id) WHERE request_id <> '' DO NOTHING;
    END IF;

    RETURN conflicts;
END $$;
