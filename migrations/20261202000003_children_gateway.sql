-- agentgate's store, version 3: whose children they are. A record is a
-- leftover only when the gateway that wrote it is gone: same host (hostname
-- and boot id) and no process with the recorded pid and start time. Several
-- gateways on one PostgreSQL then never end each other's children.
ALTER TABLE children ADD COLUMN host TEXT NOT NULL DEFAULT '';
ALTER TABLE children ADD COLUMN gateway_pid BIGINT NOT NULL DEFAULT 0;
ALTER TABLE children ADD COLUMN gateway_start BIGINT NOT NULL DEFAULT 0;
