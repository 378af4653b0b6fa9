"""The detection service: a FastAPI app around an exported detector (see `service.app`).

One module per concern: settings, images (decode + limits), vocabulary (names, built-ins,
registry), text_cache (text embeddings: memory LRU + Redis), batcher (server-side batching),
metrics, auth, schemas (request/response models), app (routes + lifespan), launch (a real
server process for tests, demos and benchmarks).
"""
