"""Peer servers over the same model code (``models.load_model``), for the side-by-side comparison.

- :mod:`bench.peers.fastapi_plain`: a synchronous FastAPI endpoint that decodes, preprocesses and
  runs the model per request (what most tutorials do);
- :mod:`bench.peers.litserve_batched`: LitServe with its dynamic batching.

Both accept the service's request form (multipart ``file`` parts at ``/v1/models/{name}/predict``),
answer with the same JSON shape, and start with ``python -m bench.peers.<module> --work-dir DIR
--model NAME --precision fp32|bf16 --port N`` on 127.0.0.1 only.
"""
