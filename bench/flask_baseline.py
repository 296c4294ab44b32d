"""The plain baseline for bench/serve.py: a Flask app, one model call per request.

This is the way image-classification services usually start: load the model once, then
for every POST decode the upload, resize, normalise, run the backbone on a batch of one,
apply the head, answer JSON. No batching across requests, no queue, no model following.
It serves the registry's champion pair (``INFANTINO_HOME`` / ``MLFLOW_TRACKING_URI``, as
the real service does) with the same decoder and preprocessing, so the answers match.

    POST /predict   multipart field ``image`` -> {label, confidence, probabilities}
    GET  /ping      200 once the models are loaded

Run from the project root (bench/serve.py starts it for you):

    .venv/bin/python -m bench.flask_baseline --port 5055                 # Flask dev server, threaded=True
    .venv/bin/gunicorn -b 127.0.0.1:5055 -w 2 'bench.flask_baseline:create_app()'
"""

from __future__ import annotations

import argparse

import numpy as np
from flask import Flask, jsonify, request


def create_app() -> Flask:
    import torch

    from backbones.inference import for_inference
    from infantino.images import ImageError, normalise, open_image, to_model_array
    from infantino.settings import get_settings
    from registry.store import CHAMPION, ModelRegistry

    settings = get_settings()
    if settings.serving.torch_threads:  # INFANTINO_TORCH_THREADS, as the service reads it
        torch.set_num_threads(settings.serving.torch_threads)
    registry = ModelRegistry(settings)
    head = registry.load_head(CHAMPION)
    backbone = registry.load_backbone(head.backbone_version)
    prep = backbone.preprocessing
    model = for_inference(backbone.model)  # eval + channels_last, as registry.load_backbone used to return it

    app = Flask("infantino-flask-baseline")

    @app.get("/ping")
    def ping():
        return jsonify(status="ok", head_version=head.version, backbone_version=backbone.version)

    @app.post("/predict")
    def predict():
        upload = request.files.get("image")
        if upload is None:
            return jsonify(error="missing_image", message="send a multipart field 'image'"), 400
        try:
            img = open_image(upload.read(), settings.limits.max_image_bytes, settings.limits.max_image_pixels, prep.input_size)
        except ImageError as exc:
            return jsonify(error=exc.code, message=str(exc)), 400
        x = normalise(to_model_array(img, prep.input_size, prep.grayscale)[None], prep)
        with torch.inference_mode():
            emb = model(torch.from_numpy(x)).float().numpy()
        p = head.model.predict_proba(emb)[0]
        best = int(np.argmax(p))
        return jsonify(label=head.classes[best], confidence=float(p[best]),
                       probabilities={c: float(v) for c, v in zip(head.classes, p)},
                       backbone_version=backbone.version, head_version=head.version)

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5055)
    args = ap.parse_args()
    create_app().run(host=args.host, port=args.port, threaded=True, debug=False, use_reloader=False)


if __name__ == "__main__":
    main()
