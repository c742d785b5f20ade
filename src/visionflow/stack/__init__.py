"""The team stack on one machine (`vflow stack up | down | status`).

PostgreSQL (MLflow's backend store, the Prefect server's database, the registry lock), an
S3-compatible object store (`rclone serve s3`: MLflow's artifacts, the DVC remote), the MLflow
tracking server proxying artifacts to S3, the Prefect server, a process work pool with the
`retrain` deployments of `prefect.yaml`, and workers. Everything binds one address (loopback
by default) and keeps its data under `.cache/stack/`.

- `postgres`: initdb, start/stop as an unprivileged user, roles and databases;
- `objectstore`: the S3 server and its buckets;
- `services`: the MLflow and Prefect servers, the work pool, deployments and workers;
- `procs`: detached processes with a pid, a log and a health check;
- `core`: the stack as a whole (credentials, state, the client environment).
"""
