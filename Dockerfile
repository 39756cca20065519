# The image every pod of deploy/kuberay/ runs: Ray's GPU image at the project's Ray pin, plus this project with
# its `gpu` extra (TensorFlow with the CUDA libraries).
#
#   docker build -t registry.example.com/vit3d-batch:0.1.0 .
#
# tests/test_kuberay.py runs the RUN pip line below in a fresh virtualenv over exactly the files copied here
# (resolution of every dependency, and a real install of the project), and checks the base image's Ray version
# against pyproject's pin.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/vit3d-batch
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users vit3d ./vit3d
COPY --chown=ray:users jobs ./jobs
RUN python -m pip install --no-cache-dir '.[gpu]'

# The job runs as `python -m jobs.score …` from any directory (installed, not only on the path here).
WORKDIR /home/ray
