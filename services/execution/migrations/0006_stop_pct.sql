-- A stop set as a percent of the entry's fill price (``stop_loss_pct`` on an order, the straddle's
-- ``leg_sl_pct``): the bracket keeps the percent until its entry fills, and then its
-- ``stop_loss`` is that percent from the entry's average fill price. ``stop_pct`` is NULL once
-- the stop is anchored (and for a stop given as a price). np_ledger_write's brackets upsert
-- writes it (the function text is 0005's with that column added).

ALTER TABLE brackets ADD COLUMN stop_pct NUMERIC CHECK (stop_pct > 0 AND stop_pct <= 500);

CREATE OR REPLACE FUNCTION np_ledger_write(p_orders jsonb, p_children jsonb, p_updates jsonb, p_events jsonb,
                                p_fills jsonb, p_brackets jsonb, p_risk jsonb)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    skipped uuid[] := '{}';
    conflicts text[] := '{}';
    more_skipped uuid[];
    more_conflicts text[];
    rows jsonb;
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
        UPDATE order_ledger AS t
           SET exchange_id = v.exchange_id, quantity = v.quantity, price = v.price,
               trigger_price = v.trigger_price, status = v.status, filled_qty = v.filled_qty,
               avg_price = v.avg_price, cancel_requested = v.cancel_requested, reason = v.reason,
               raw_response = coalesce(v.raw_response, t.raw_response), updated_at = v.updated_at
          FROM jsonb_to_recordset(p_updates) AS v(
                   internal_id uuid, exchange_id text, quantity int, price numeric, trigger_price numeric,
                   status text, filled_qty int, avg_price numeric, cancel_requested bool, reason text,
                   raw_response jsonb, updated_at timestamptz)
         WHERE t.internal_id = v.internal_id AND NOT (v.internal_id = ANY (skipped));
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
