-- Multi-leg (basket) orders. One row per basket: its legs (order ids in the request's
-- order), its rollback closes, and how far execution got. The legs are ordinary
-- order_ledger rows; this row is what lets a restart finish the basket (release the short
-- legs that were held, or roll back). Written in the same transaction as the rows it names.

CREATE TABLE baskets (
    basket_id    UUID PRIMARY KEY,
    request_id   TEXT NOT NULL UNIQUE,
    strategy_id  TEXT NOT NULL,
    legs         UUID[] NOT NULL,
    closes       UUID[] NOT NULL DEFAULT '{}',
    state        TEXT NOT NULL
                 CHECK (state IN ('PLACING_LONGS', 'PLACED', 'COMPLETE', 'ROLLING_BACK', 'FAILED')),
    rollback     BOOLEAN NOT NULL DEFAULT TRUE,
    reason       TEXT NOT NULL DEFAULT '',
    trading_day  DATE NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX baskets_open ON baskets (state) WHERE state IN ('PLACING_LONGS', 'PLACED', 'ROLLING_BACK');
