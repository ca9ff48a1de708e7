"""Peer (b): LitServe with dynamic batching over the same model code.

``decode_request`` decodes and preprocesses one upload, ``batch`` stacks, ``predict`` runs one
forward pass, ``unbatch`` splits, ``encode_response`` writes api.md's JSON. LitServe runs these in
its inference worker process and collects a batch of up to ``--max-batch-size`` requests or
``--batch-timeout`` seconds. One worker, one API server process, its defaults otherwise.

``python -m bench.peers.litserve_batched --work-dir DIR --model vgg16 --precision bf16 --port 8002``
"""

# no ``from __future__ import annotations``: LitServe reads decode_request's annotation at run time

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import litserve as ls
import torch
from PIL import Image
from starlette.requests import Request

from bench.peers.common import encode, load, parse_args, predict_batch


class VisionAPI(ls.LitAPI):  # type: ignore[misc]  # litserve ships no type information
    """setup -> decode -> batch -> predict -> unbatch -> encode, over ``models.load_model``."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout,
            api_path=f"/v1/models/{args.model}/predict",
        )
        self.args = args

    def setup(self, device: str) -> None:
        self.predictor = load(self.args)

    def decode_request(self, request: Request) -> tuple[torch.Tensor, tuple[int, int]]:
        # annotated Request, LitServe hands over the parsed form (multipart) or JSON body
        upload = request["file"]
        image = Image.open(upload.file).convert("RGB")
        return self.predictor.preprocess(image), image.size

    def batch(self, inputs: list[tuple[torch.Tensor, tuple[int, int]]]) -> Any:
        return torch.stack([x for x, _ in inputs]), [size for _, size in inputs]

    def predict(self, x: Any) -> list[tuple[Any, tuple[int, int]]]:
        batch, sizes = x
        outputs = predict_batch(self.predictor, batch, sizes)
        assert len(outputs) == len(sizes)
        return list(zip(outputs, sizes, strict=True))

    def unbatch(self, output: Any) -> list[Any]:
        return list(output)

    def encode_response(self, output: Any) -> dict[str, Any]:
        result, size = output
        return {"model": self.args.model, "results": [encode(self.predictor, 0, size, result)]}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("python -m bench.peers.litserve_batched", argv)
    server = ls.LitServer(
        VisionAPI(args), accelerator="cuda" if args.device.startswith("cuda") else "cpu", workers_per_device=1
    )
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
