import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_models import CONFIGS, make_hf_model  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA GPU on this machine"))]


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory):
    """name -> (transformers model, saved dir), built lazily once per session."""
    root = tmp_path_factory.mktemp("hf_models")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            d = str(root / name)
            cache[name] = (make_hf_model(name, d), d)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def smollm_path():
    from tiergen.weights.source import embedded_model_path
    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    """transformers' own load of the embedded GGUF (slow: once per session)."""
    from transformers import AutoModelForCausalLM
    d, f = os.path.split(smollm_path)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


__all__ = ["CONFIGS"]
