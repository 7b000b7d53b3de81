"""The local slide explorer: `mitosis-ldm serve` (FastAPI + uvicorn, OpenSeadragon page).

Modules: `tiles` (slides and Deep Zoom tiles), `worker` (one model thread, bounded
queue), `explorer` (nucleus, transition, scores, features, export, datasets),
`app` (the routes), `cli` (the command). The page lives in `static/`.
"""
