"""The store-and-forward path: ingest (durable spool file and queue rows), the spool, the queue, delivery."""
