-- agentgate's store, version 1. Portable SQL: the same statements run on
-- SQLite and PostgreSQL (TEXT and BIGINT only; JSON kept as TEXT).

-- One row per session: its durable fields as JSON, and the highest event id
-- it may have handed out (ids are reserved ahead, so a killed gateway never
-- reuses one).
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    seq_ceiling BIGINT NOT NULL DEFAULT 0
);

-- Every message of every session, in the session's order.
CREATE TABLE messages (
    session_id TEXT NOT NULL,
    ord BIGINT NOT NULL,
    id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    PRIMARY KEY (session_id, ord)
);

-- Each session's event log within the replay limits.
CREATE TABLE events (
    session_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    name TEXT NOT NULL,
    message_id TEXT,
    data TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

-- Children a gateway started, so the next one can end them if it was killed.
CREATE TABLE children (
    session_id TEXT PRIMARY KEY,
    pid BIGINT NOT NULL,
    start_time BIGINT NOT NULL
);
