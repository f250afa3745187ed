"""The edge HTTP service: FastAPI on uvicorn, one router per resource (see docs/edge.md)."""
