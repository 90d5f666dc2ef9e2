"""Local tooling that drives the system from outside: the stack (Redis, Label Studio, backend,
workers), the demo, simulated engineers, benchmarks, screenshots.

It imports the served core (`backend`), never `backend.study`; the core never imports it.
Not part of the Docker image.
"""
