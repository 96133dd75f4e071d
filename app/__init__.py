"""The job service: FastAPI front end, job database, artifact store, auth."""
