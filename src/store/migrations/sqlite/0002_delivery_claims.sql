-- Version 2: a fencing token for delivery leases.
-- `claims` counts the claims of a delivery and is never reset. An attempt finishes with the
-- count its claim returned, so an attempt that outlived its lease (and whose delivery has been
-- claimed again since) can no longer release the newer lease or apply its outcome.

ALTER TABLE deliveries ADD COLUMN claims INTEGER NOT NULL DEFAULT 0;
