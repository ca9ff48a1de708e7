"""Peer (a): a plain FastAPI app that runs the model inside a synchronous endpoint, per request.

The tutorial way: a ``def`` endpoint (FastAPI runs it in its thread pool), ``UploadFile``, PIL
decode, the model's transform, one forward pass for the one image, JSON. No batching, no queue
bound, no deadline; uvicorn with one worker and default settings.

``python -m bench.peers.fastapi_plain --work-dir DIR --model vgg16 --precision fp32 --port 8001``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, File, HTTPException, UploadFile
from PIL import Image

from bench.peers.common import encode, load, parse_args, predict_batch
from models import Classifier, Detector


def create_app(predictor: Classifier | Detector) -> FastAPI:
    app = FastAPI(title="plain FastAPI peer")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/models/{name}/predict")
    def predict(name: str, file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008 (FastAPI idiom)
        if name != predictor.info.name:
            raise HTTPException(404, f"no model {name!r}")
        try:
            image = Image.open(file.file).convert("RGB")
        except Exception as e:  # PIL raises several kinds
            raise HTTPException(400, f"not an image: {e}") from None
        batch = predictor.preprocess(image).unsqueeze(0)  # (3, H, W) -> (1, 3, H, W)
        output = predict_batch(predictor, batch, [image.size])[0]
        return {"model": name, "results": [encode(predictor, 0, image.size, output)]}

    return app


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    args = parse_args("python -m bench.peers.fastapi_plain", argv)
    app = create_app(load(args))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
