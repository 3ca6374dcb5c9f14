"""Load tests (locust) and operational drills for the serving stack; see monitoring/README.md."""
