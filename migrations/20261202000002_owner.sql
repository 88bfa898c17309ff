-- agentgate's store, version 2: a session's owner (the JWT `sub` that
-- created it; NULL for the operator's sessions), in a column of its own so
-- that an owner's sessions can be counted and listed by the store.
ALTER TABLE sessions ADD COLUMN owner TEXT;
