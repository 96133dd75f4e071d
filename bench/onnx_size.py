"""File size of the ONNX export of an artifact next to the FP32 export of its model.

    python bench/onnx_size.py ARTIFACT_DIR

Prints one line per graph: FP32 bytes, quantized bytes, ratio. The FP32 export is of the
artifact's architecture with its built-in weights (the built-in models only, for now).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from d4c_core.api import load_model
from d4c_core.onnx_export import export_onnx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    args = p.parse_args()
    arch = json.loads((args.artifact / "manifest.json").read_text())["model"]["arch"]
    with tempfile.TemporaryDirectory() as tmp:
        quantized = export_onnx(args.artifact, Path(tmp) / "q")
        fp32 = export_onnx(load_model(arch), Path(tmp) / "fp32")
        for tower, path in quantized.items():
            q, f = path.stat().st_size, fp32[tower].stat().st_size
            print(f"{arch} {tower}: FP32 {f:,} B, quantized {q:,} B, {q / f:.3f}x")


if __name__ == "__main__":
    main()
