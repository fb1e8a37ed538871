"""Property tests of ``ckptport port``: random small functional Keras graphs from the supported
layer set (convs with TF 'same' padding and strides, depthwise/separable, BatchNorm with random
momentum/eps/center/scale, activations, pools, padding, adds, multiplies, concatenations, Flatten or
global pooling into Dense) are built by ONE Keras process (fixtures/keras_graph_server.py), ported,
loaded with plain torch and compared with Keras: outputs at float32 rounding and one training-mode
BatchNorm step. Cheap on purpose: few examples, tiny shapes, no deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import ROOT  # noqa: E402
from test_port import assert_bn_step_matches, assert_matches_keras, load_port  # noqa: E402

ACTIVATIONS = ["relu", "relu6", "swish", "gelu", "tanh", "sigmoid", "elu", "hard_sigmoid", "selu"]


def out_size(size: int, k: int, s: int, padding: str) -> int:
    return -(-size // s) if padding == "same" else (size - k) // s + 1


@st.composite
def spatial_op(draw, shape):
    """One layer on a (H, W, C) tensor: its node and output shape."""
    h, w, c = shape
    op = draw(
        st.sampled_from(["conv", "depthwise", "separable", "bn", "activation", "pool", "pad"])
    )
    if op == "bn":
        node = {"op": "bn", "momentum": draw(st.sampled_from([0.9, 0.99, 0.999]))}
        node |= {"epsilon": draw(st.sampled_from([1e-3, 1.001e-5])), "center": draw(st.booleans())}
        return node | {"scale": draw(st.booleans())}, shape
    if op == "activation":
        return {"op": "activation", "activation": draw(st.sampled_from(ACTIVATIONS))}, shape
    if op == "pad":
        p = draw(st.tuples(st.integers(0, 1), st.integers(0, 1)))
        return {"op": "zeropad", "padding": [list(p), list(p[::-1])]}, (h + sum(p), w + sum(p), c)
    k, s = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from(["same", "valid"]))
    if min(h, w) < k or out_size(min(h, w), k, s, padding) < 1:
        return {"op": "activation", "activation": "relu"}, shape
    out = (out_size(h, k, s, padding), out_size(w, k, s, padding))
    if op == "pool":
        node = {"op": draw(st.sampled_from(["maxpool", "avgpool"])), "pool_size": k}
        return node | {"strides": s, "padding": padding}, (*out, c)
    node = {"op": op, "kernel_size": k, "strides": s, "padding": padding}
    node["use_bias"] = draw(st.booleans())
    if op == "depthwise":
        return node | {"depth_multiplier": draw(st.sampled_from([1, 2]))}, (
            *out,
            c * node.get("depth_multiplier", 1),
        )
    filters = draw(st.integers(2, 6))
    node |= {"filters": filters, "activation": draw(st.sampled_from(["linear", "relu", "swish"]))}
    return node, (*out, filters)


@st.composite
def graphs(draw):
    shape = (
        draw(st.sampled_from([4, 6, 8])),
        draw(st.sampled_from([5, 6])),
        draw(st.integers(1, 3)),
    )
    shapes, nodes = [shape], []
    for _ in range(draw(st.integers(2, 7))):
        same = [i for i, s in enumerate(shapes) if s == shapes[-1]]
        near = [i for i, s in enumerate(shapes) if s[:2] == shapes[-1][:2]]
        kind = draw(st.sampled_from(["layer", "layer", "merge", "concat"]))
        last = len(shapes) - 1
        if kind == "merge" and len(same) > 1:
            other = draw(st.sampled_from(same[:-1]))
            nodes.append(
                {"op": draw(st.sampled_from(["add", "multiply"])), "inputs": [last, other]}
            )
            shapes.append(shapes[-1])
        elif kind == "concat" and len(near) > 1:
            other = draw(st.sampled_from(near[:-1]))
            nodes.append({"op": "concat", "inputs": [last, other]})
            shapes.append((*shapes[-1][:2], shapes[-1][2] + shapes[other][2]))
        else:
            node, out = draw(spatial_op(shapes[-1]))
            nodes.append(node | {"inputs": [last]})
            shapes.append(out)
    nodes.append({"op": draw(st.sampled_from(["gap", "flatten"])), "inputs": [len(shapes) - 1]})
    nodes.append({"op": "dense", "units": 3, "inputs": [len(shapes)]})
    return {"input": list(shape), "nodes": nodes}


@pytest.fixture(scope="module")
def keras_server():
    """The one Keras process building every example."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(ROOT / "fixtures" / "keras_graph_server.py")]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=graphs())
def test_port_random_graphs(spec, keras_server, tmp_path_factory):
    from converter.porting import port

    out = tmp_path_factory.mktemp("graph")
    keras_server.stdin.write(json.dumps(spec | {"out": str(out)}) + "\n")
    keras_server.stdin.flush()
    answer = keras_server.stdout.readline().strip()
    assert answer == "ok", f"{answer} for {spec}"
    port(out / "model.keras", out / "net.py", verify=False)
    ref = np.load(out / "reference.npz")
    model = load_port(out / "net.py")
    assert_matches_keras(model, [ref["x/0"]], [ref["y/0"]])
    assert_bn_step_matches(model, [ref["x/0"]], ref)
