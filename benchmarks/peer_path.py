"""The peer path of issue 12 (benchmark, not a test): what a user does today without ckptport.
Keras loads the ``.keras`` model, tf2onnx exports it (Python API), onnx2torch turns the ONNX graph
into a torch module, torch.save writes its state_dict. One process, timed whole by
benchmarks/run.py; prints one JSON line: the time of each step and what came out.

    python benchmarks/peer_path.py model.keras out.pt [--opset 13]

torch and onnx2torch are imported before TensorFlow (the other order segfaults this stack).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import onnx2torch  # noqa: E402
import torch  # noqa: E402


def convert(src: str, dst: str, opset: int) -> dict:
    """The four steps, each timed; what the torch module holds (BatchNorm modules, tensors)."""
    import keras
    import tensorflow as tf
    import tf2onnx

    times, t = {}, time.perf_counter()
    model = keras.models.load_model(src, compile=False)
    times["keras_load_s"], t = time.perf_counter() - t, time.perf_counter()
    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    times["tf2onnx_s"], t = time.perf_counter() - t, time.perf_counter()
    torch_model = onnx2torch.convert(onnx_model)
    times["onnx2torch_s"], t = time.perf_counter() - t, time.perf_counter()
    state = torch_model.state_dict()
    torch.save(state, dst)
    times["torch_save_s"] = time.perf_counter() - t
    batchnorms = [
        m for m in torch_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    keras_bn = [l for l in model._flatten_layers() if l.__class__.__name__ == "BatchNormalization"]
    return {
        **times,
        "tensors": len(state),
        "batchnorm_modules": len(batchnorms),
        "keras_batchnorm_layers": len(keras_bn),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--opset", type=int, default=13)
    args = ap.parse_args(argv)
    print(json.dumps(convert(args.src, args.dst, args.opset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
