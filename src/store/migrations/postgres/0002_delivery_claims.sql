-- Version 2: a fencing token for delivery leases.
-- `claims` counts the claims of a delivery and is never reset. An attempt finishes with the
-- count its claim returned, so an attempt that outlived its lease (and whose delivery another
-- worker has claimed since) can no longer release that worker's lease or apply its outcome.
-- A constant default makes this an instant, metadata-only change (PostgreSQL 11 and later);
-- binaries at version 1 keep working against it (they leave the column alone).

ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS claims bigint NOT NULL DEFAULT 0;
