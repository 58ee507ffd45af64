"""`cifar-dist serve`: a trained model behind HTTP.

    model.py     the served model: a torch model.pt (or checkpoint) or an exported onnx file, its card
    batcher.py   dynamic batching: a bounded queue of images and one inference worker (no HTTP)
    app.py       the FastAPI app: /v1/predict, /v1/model, /healthz, /readyz, /metrics, the upload page
    command.py   the command line: checks, the socket, uvicorn, a graceful SIGTERM
    index.html   the upload page at /
"""
