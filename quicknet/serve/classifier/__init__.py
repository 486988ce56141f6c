"""Our own API, on both transports: REST `/classify` + `/v1/models`, and gRPC `quicknet.v1.Classifier`."""
