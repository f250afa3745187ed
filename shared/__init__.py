"""What the edge and the coordinator both import: data, models, metrics, ONNX export."""
