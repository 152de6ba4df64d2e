"""`cifar-transfer serve`: a trained bundle behind HTTP (FastAPI on uvicorn) with dynamic batching.

model.py is the one place that imports the rest of cifar_transfer; batcher.py gathers concurrent
requests into one forward pass; app.py is the ASGI app (limits, errors, endpoints, the page);
cli/parser.py adds the subcommand.
"""
