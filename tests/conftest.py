from __future__ import annotations

import os

# keep onnxruntime from oversubscribing the 2-core machine when tests run
os.environ.setdefault("OMP_NUM_THREADS", "1")
