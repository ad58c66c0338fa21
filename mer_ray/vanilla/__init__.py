"""The vanilla multi-task model: plain-PyTorch model and batching, Ray Train training, prediction, artifacts, the end-to-end recipe."""
