"""The detection service: a FastAPI app around an exported detector (see `ovd.service.app`).

One module per concern: settings (OVD_* environment), errors (the JSON error type), images
(decode + limits), vocabulary (names, built-ins, registry), redis_store (the Redis connection
and its failure accounting), text_cache (text embeddings: memory LRU + Redis), batcher
(server-side batching), metrics, auth, schemas (request/response models), app (routes +
lifespan), launch (a real server process for tests, demos and benchmarks), static/ (the web
page).
"""
