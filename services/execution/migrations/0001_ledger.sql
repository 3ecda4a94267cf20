-- NeoPulse execution ledger (DESIGN §6). Money is NUMERIC; ids are UUIDs; times timestamptz.

CREATE TABLE order_ledger (
    internal_id       UUID PRIMARY KEY,
    request_id        TEXT NOT NULL UNIQUE,                 -- idempotency key of the request
    client_tag        TEXT NOT NULL UNIQUE,                 -- sent as the broker's `tag` (GuiOrdId)
    exchange_id       TEXT,                                 -- the broker's order number
    token             TEXT NOT NULL,
    exchange_segment  TEXT NOT NULL,
    trading_symbol    TEXT NOT NULL,
    transaction_type  TEXT NOT NULL CHECK (transaction_type IN ('BUY', 'SELL')),
    order_type        TEXT NOT NULL,                        -- LIMIT | SL (stop-limit), as sent
    product           TEXT NOT NULL,
    quantity          INTEGER NOT NULL CHECK (quantity >= 0),
    price             NUMERIC,
    trigger_price     NUMERIC,
    status            TEXT NOT NULL CHECK (status IN ('PENDING_BROKER', 'ACK', 'OPEN', 'PARTIAL',
                                                      'COMPLETE', 'REJECTED', 'CANCELLED', 'UNKNOWN')),
    filled_qty        INTEGER NOT NULL DEFAULT 0 CHECK (filled_qty >= 0),
    avg_price         NUMERIC,
    strategy_id       TEXT NOT NULL,
    parent_id         UUID REFERENCES order_ledger (internal_id),   -- slices of a parent order
    bracket_id        UUID,                                 -- OCO group (entry and legs)
    broker            TEXT NOT NULL,
    purpose           TEXT NOT NULL,                        -- ENTRY EXIT FLATTEN MANUAL STOP TARGET
    sliced            BOOLEAN NOT NULL DEFAULT false,       -- a parent that never reaches the broker
    cancel_requested  BOOLEAN NOT NULL DEFAULT false,
    reason            TEXT NOT NULL DEFAULT '',
    raw_response      JSONB,
    trading_day       DATE NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL
) WITH (fillfactor = 80);  -- room for HOT updates: every order row is updated several times
CREATE INDEX order_ledger_open ON order_ledger (status)
    WHERE status NOT IN ('COMPLETE', 'REJECTED', 'CANCELLED');
CREATE INDEX order_ledger_created ON order_ledger (created_at DESC);
CREATE INDEX order_ledger_day ON order_ledger (trading_day);
CREATE INDEX order_ledger_bracket ON order_ledger (bracket_id) WHERE bracket_id IS NOT NULL;
CREATE INDEX order_ledger_parent ON order_ledger (parent_id) WHERE parent_id IS NOT NULL;

-- Append-only: every transition with its raw payload.
CREATE TABLE order_events (
    id           BIGSERIAL PRIMARY KEY,
    order_id     UUID NOT NULL REFERENCES order_ledger (internal_id),
    ts           TIMESTAMPTZ NOT NULL,
    kind         TEXT NOT NULL,
    from_status  TEXT NOT NULL DEFAULT '',
    to_status    TEXT NOT NULL DEFAULT '',
    payload      JSONB
);
CREATE INDEX order_events_order ON order_events (order_id, id);

CREATE FUNCTION order_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'order_events is append-only';
END $$;
CREATE TRIGGER order_events_no_update BEFORE UPDATE OR DELETE ON order_events
    FOR EACH ROW EXECUTE FUNCTION order_events_append_only();

-- Trades at the broker. Exchange trade numbers restart every day, so the broker's trade id
-- is unique per broker and trading day.
CREATE TABLE fills (
    id               BIGSERIAL PRIMARY KEY,
    trade_id         TEXT NOT NULL,
    broker           TEXT NOT NULL,
    trading_day      DATE NOT NULL,
    order_id         UUID NOT NULL REFERENCES order_ledger (internal_id),
    exchange_id      TEXT NOT NULL DEFAULT '',
    strategy_id      TEXT NOT NULL,
    token            TEXT NOT NULL,
    exchange_segment TEXT NOT NULL,
    trading_symbol   TEXT NOT NULL,
    transaction_type TEXT NOT NULL CHECK (transaction_type IN ('BUY', 'SELL')),
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    price            NUMERIC NOT NULL CHECK (price > 0),
    ts               TIMESTAMPTZ NOT NULL,
    raw              JSONB,
    UNIQUE (broker, trading_day, trade_id)
);
CREATE INDEX fills_order ON fills (order_id);
CREATE INDEX fills_day ON fills (trading_day, id);

-- OCO brackets: an entry with a protective stop-limit and a target.
CREATE TABLE brackets (
    bracket_id        UUID PRIMARY KEY,
    entry_id          UUID NOT NULL UNIQUE REFERENCES order_ledger (internal_id),
    strategy_id       TEXT NOT NULL,
    token             TEXT NOT NULL,
    exchange_segment  TEXT NOT NULL,
    trading_symbol    TEXT NOT NULL,
    transaction_type  TEXT NOT NULL CHECK (transaction_type IN ('BUY', 'SELL')),
    product           TEXT NOT NULL,
    stop_loss         NUMERIC,
    stop_limit        NUMERIC,
    target            NUMERIC,
    state             TEXT NOT NULL,
    entry_filled      INTEGER NOT NULL DEFAULT 0,
    exit_filled       INTEGER NOT NULL DEFAULT 0,
    reason            TEXT NOT NULL DEFAULT '',
    trading_day       DATE NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX brackets_open ON brackets (state) WHERE state IN ('PENDING_ENTRY', 'ACTIVE');

CREATE TABLE instrument_master (
    exchange_segment TEXT NOT NULL,
    token            TEXT NOT NULL,
    trading_symbol   TEXT NOT NULL,
    name             TEXT NOT NULL DEFAULT '',
    inst_type        TEXT NOT NULL DEFAULT '',
    lot_size         INTEGER NOT NULL DEFAULT 1,
    tick_size        NUMERIC NOT NULL,
    freeze_qty       INTEGER NOT NULL DEFAULT 0,
    expiry           DATE,
    strike           NUMERIC,
    option_type      TEXT NOT NULL DEFAULT '',
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (exchange_segment, token)
);
CREATE INDEX instrument_master_symbol ON instrument_master (upper(trading_symbol));

-- Kill switch and limit breaches, with reason and source.
CREATE TABLE risk_events (
    id           BIGSERIAL PRIMARY KEY,
    ts           TIMESTAMPTZ NOT NULL,
    trading_day  DATE NOT NULL,
    event        TEXT NOT NULL,
    reason       TEXT NOT NULL DEFAULT '',
    source       TEXT NOT NULL DEFAULT '',
    request_id   TEXT NOT NULL DEFAULT '',                 -- risk retries until acknowledged
    data         JSONB
);
CREATE INDEX risk_events_day ON risk_events (trading_day, id);
CREATE UNIQUE INDEX risk_events_request ON risk_events (request_id) WHERE request_id <> '';
