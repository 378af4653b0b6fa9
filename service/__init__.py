"""The detection service: a FastAPI app around an exported detector (`ovd.service.app.create_app`).

One module per concern:
    app                   create_app: wires runtime, middleware, error handlers and routers
    serving               the served model's lifecycle (load, warm-up, close) and its resources
    deps                  typed route dependencies: settings, metrics, Redis store, model, API key
    routes_ops            /, /livez, /readyz, /metrics
    routes_models         /v1/models
    routes_detect         /v1/detect, /v1/detect/batch
    routes_vocabularies   /v1/vocabularies[/{id}]
    error_handlers        every error as JSON, and the request-body limit
    disconnect            cancels a detect request whose client went away
    security_headers      nosniff, frame and referrer headers on all responses, CSP on the page
    admission             admission by cost: pixel and prompt budgets, the classification bound
    schemas               request and response models (the OpenAPI schema)
    settings              the OVD_* environment
    errors                ApiError, the one refusal type
    auth                  the bearer API-key check
    images                decoding and image limits
    vocabulary            class names, templates, built-in and registered vocabularies
    text_cache            text embeddings: memory LRU + Redis
    redis_store           the Redis connection and its failure accounting
    batcher               server-side batching in front of the detector
    metrics               Prometheus metrics and their middleware
    launch                `ovd serve` in a subprocess (what `ovd demo` queries)
    cli                   the `ovd serve` and `ovd demo` commands
    static/               the web page
"""
