"""The online service: REST + gRPC fronts, one dynamic batcher, pluggable engines. No torch on CPU."""
