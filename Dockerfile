# SlotMemory runtime image: the project, torch (CUDA 12.8 wheels), Ray 2.60.0 and the AWS EFA
# userspace, for ray_cluster.yaml (docker: section) and cluster/kuberay-rayjob.yaml.
#
# Build and push (the one command both manifests' image name comes from; REPLACE the account id
# and region with your ECR registry, and keep the tag equal to pyproject's version):
#   docker build -t 123456789012.dkr.ecr.us-west-2.amazonaws.com/slotmem:0.1.0 .
#   docker push 123456789012.dkr.ecr.us-west-2.amazonaws.com/slotmem:0.1.0
#
# Base image: Ray's own GPU image for exactly the Ray version the manifests pin (rayVersion 2.60.0),
# Python 3.11, CUDA 12.8. Chosen over a bare nvidia/cuda runtime image because it already has what
# the two launchers assume inside the container: the non-root user `ray` (uid 1000, gid 100,
# passwordless sudo) with HOME=/home/ray, conda Python 3.11 on PATH, and rsync / openssh-client /
# tmux / wget that the Ray cluster launcher's docker mode uses (file sync into the container,
# autoscaler SSH to workers). Its CUDA libraries are not what torch uses (the cu128 torch wheel
# brings its own CUDA 12.8 runtime, cuDNN and NCCL as pip packages); what matters on the host is an
# NVIDIA driver >= 570, which the Deep Learning Base AMI in ray_cluster.yaml and the EKS
# accelerated AMIs provide.
FROM rayproject/ray:2.60.0-py311-cu128

# torch wheel: version pinned like Makefile/README (torch==2.13.0) and taken from the PyTorch
# index of the CUDA version in the base image's tag. The exact local version (+cu128) only exists
# on that index, so pip cannot silently pick PyPI's default build (CUDA 13 for torch 2.13).
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128

# AWS EFA userspace (libfabric with the efa provider + the aws-ofi-nccl plugin, both in the EFA
# installer since 1.47) so NCCL can use EFA/RDMA between trainer nodes. AWS-specific: build with
# --build-arg EFA_INSTALLER_VERSION=none to leave it out (NCCL then uses TCP sockets). The kernel
# module comes from the host AMI, hence --skip-kmod.
ARG EFA_INSTALLER_VERSION=1.48.0
USER root
RUN if [ "${EFA_INSTALLER_VERSION}" != "none" ]; then \
      set -eux; \
      apt-get update; \
      apt-get install -y --no-install-recommends curl ca-certificates; \
      curl -fsSL "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" \
        | tar -xz -C /tmp; \
      cd /tmp/aws-efa-installer; \
      ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify; \
      cd /; rm -rf /tmp/aws-efa-installer /var/lib/apt/lists/*; \
    fi
# Back to the image's non-root user (numeric, so Kubernetes' runAsNonRoot can verify it).
USER 1000

# The plugin directory differs between distributions (Debian multiarch subdirectory or not); NCCL
# loads libnccl-net.so from LD_LIBRARY_PATH. No Hugging Face downloads at run time: weights are
# local paths (model.*_path). No JIT-built DeepSpeed ops (the optimizer is torch's AdamW).
ENV LD_LIBRARY_PATH=/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu:/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib:${LD_LIBRARY_PATH} \
    HF_HUB_OFFLINE=1 \
    DS_BUILD_OPS=0 \
    PYTHONUNBUFFERED=1

# Heavy, rarely changing layer first: torch, Ray (re-pinned: the base image's copy must stay the
# manifests' version), NVML bindings for MLflow's GPU system metrics.
RUN python -m pip install --no-cache-dir --extra-index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
      "torch==${TORCH_VERSION}+${TORCH_CUDA}" \
      "ray[default,train,data]==2.60.0" \
      "nvidia-ml-py>=12.570"

# The project (what .dockerignore leaves of the checkout). /app is also the RayJob's working_dir,
# so `--config configs/...` resolves there. The same pins keep pip from moving torch or Ray while
# it resolves the project's own dependencies.
WORKDIR /app
COPY --chown=1000:100 . /app
RUN python -m pip install --no-cache-dir --extra-index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
      "torch==${TORCH_VERSION}+${TORCH_CUDA}" \
      "ray[default,train,data]==2.60.0" \
      /app \
 && slotmem --help > /dev/null \
 && python -c "import ray, torch; assert ray.__version__ == '2.60.0', ray.__version__; print('ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
