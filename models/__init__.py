"""Reference models for onnxcomp: build scripts for trained, generated and third-party models."""
