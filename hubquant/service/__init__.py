"""Automation: the release watcher, the webhook conversion service, its durable queue, workers and Ray backend.

Modules: jobs (what a job is, its key, running it through hubquant.convert), queue (SQLite queue with
leases, retries and a failed list), workers (worker processes), app (the HTTP service), watcher
(`hubquant watch`), ray_backend (jobs as Ray tasks), cli (`watch`, `serve`).
"""
