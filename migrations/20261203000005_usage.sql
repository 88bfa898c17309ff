-- agentgate's store, version 5: a session's usage summed over its messages,
-- and how many it has, so a restarted gateway can show every session
-- without reading its messages (SPEC §7: start-up must not load the world).
-- Written with each message, in the same transaction; `usage_version` only
-- grows, so an older sum written late never replaces a newer one. NULL for
-- a session stored before this version: the gateway then reads its
-- messages once.
ALTER TABLE sessions ADD COLUMN usage TEXT;
ALTER TABLE sessions ADD COLUMN usage_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN message_count BIGINT NOT NULL DEFAULT 0;
