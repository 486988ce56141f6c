"""The servers a user would pick instead of this one, each configured as its docs recommend for
throughput, serving the same ONNX model with the same ONNX Runtime session settings. Started by
benchmarks/peers.py from their own venv (`make bench-peers`)."""
