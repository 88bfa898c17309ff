-- agentgate's store, version 4: several gateways on one PostgreSQL (SPEC §8).
-- Portable SQL like the rest; only PostgreSQL gateways use these tables.

-- Which node runs a session's child: the holder of its lease. `generation`
-- grows with every new holder and fences the old one's writes; `expires_at`
-- (milliseconds since the epoch, the database's clock) is pushed forward by
-- the holder well within the TTL.
CREATE TABLE leases (
    session_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    generation BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- Messages posted on a node that does not hold the session's lease: stored
-- (acknowledged) here, taken by the holder into the session's queue.
CREATE TABLE inbox (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created BIGINT NOT NULL
);

-- Interrupts, permission answers, option changes and deletes for a session
-- held by another node: the holder claims, runs and answers each.
CREATE TABLE commands (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    body TEXT NOT NULL,
    claimed BIGINT NOT NULL DEFAULT 0,
    reply TEXT
);

-- A message's status beside its body, so a node can find work left by a
-- dead holder (queued or running messages of sessions without a live lease).
ALTER TABLE messages ADD COLUMN status TEXT NOT NULL DEFAULT '';
CREATE INDEX messages_status ON messages (status);
