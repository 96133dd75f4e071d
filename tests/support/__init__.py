"""Support code for tests and benchmarks that run real services: throwaway PostgreSQL and
Redis databases, private servers a test may kill, ``d4c`` subprocesses, job rows with
test-sized recipes, and a whole service stack.

It lives under ``tests/`` so no production package ships it; ``bench/`` imports it from here
(``bench/_paths.py`` puts the repository root on ``sys.path``).

- ``procs``: ``d4c`` subprocesses, their environment, polling, skips.
- ``pg``: PostgreSQL databases and private clusters.
- ``redisdb``: Redis databases and private servers.
- ``jobs``: test-sized recipes, HTTP bodies, job rows.
- ``stack``: ``ServiceStack``, one deployment on this machine.
"""
