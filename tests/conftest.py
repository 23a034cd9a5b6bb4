"""Shared test setup: ONNX Runtime logs only errors a test did not expect to provoke."""

import onnxruntime as ort

ort.set_default_logger_severity(4)
