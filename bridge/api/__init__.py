"""The daemon's HTTP server (``http:`` in the configuration; docs/api.md): Prometheus
metrics, health and readiness, version, OpenAPI docs, the static DICOMweb trees that ask
to be served, and under ``/api`` (bearer token) the admin API and the JSON query and
retrieve API. FastAPI on uvicorn, in a thread of the daemon's process."""
