"""featmap jobs: the `featmap` command and its jobs (extract, bench, summary, visualize,
export-onnx, import), which may use both the client library and the service."""
