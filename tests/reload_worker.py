"""Runs in a fresh Python process: loads saved models and records their outputs.

Usage: python reload_worker.py TASKS.json — a list of tasks, each
{"loader": "vit3d" | "keras", "artifact": path, "inputs": .npy path, "out": .npz path}.
Outputs (call and, when the model has it, embed) or the error go to ``out``.
All tasks run in one process so that the suite pays for one TensorFlow start.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import keras_test_models  # noqa: E402,F401  (registers the test-only classes)
import numpy as np  # noqa: E402

import vit3d  # noqa: E402


def run(task):
    x = np.load(task["inputs"])
    try:
        load = vit3d.load if task["loader"] == "vit3d" else keras.saving.load_model
        model = load(task["artifact"])
    except Exception as e:  # recorded for the test to assert on
        np.savez(task["out"], error_type=type(e).__name__, error=str(e))
        return
    outputs = {"call": keras.ops.convert_to_numpy(model(x))}
    if hasattr(model, "embed"):
        outputs["embed"] = keras.ops.convert_to_numpy(model.embed(x))
    np.savez(task["out"], **outputs)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        for task in json.load(f):
            run(task)
