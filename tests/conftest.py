"""Shared fixtures: tiny randomly initialised causal LMs of the supported families (one factory for all tests), an
offline byte-level BPE tokenizer, and a one-thread switch for modules that run many tiny forwards."""
from __future__ import annotations

import copy
import importlib.metadata
import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter (set before anything imports triton); on a GPU they
# are compiled, as users run them. Interpreters older than the supported triton (the [triton] extra's floor, 3.9)
# cannot run them with numpy >= 2.5 (a scalar argument reaches int() as a 1-element array), so there the kernel
# tests skip (make test-gpu-image: the GPU image's triton 3.6 runs them compiled on the GPU).
TRITON_FLOOR = (3, 9)


def _triton_version() -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


_TRITON = _triton_version()
if not torch.cuda.is_available() and (_TRITON is None or _TRITON >= TRITON_FLOOR):
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # where device-generic tests build every tensor
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma")

# vocab 128, hidden 64, 2 layers, 4 query heads, 2 KV heads (GQA), head_dim 16; pad/bos/eos = 0/1/2.
_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False,
)
_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "phi3": ("Phi3Config", {}),
    "gemma": ("GemmaConfig", {}),
}


def tiny_config(family: str = "llama", **overrides):
    """The config of a tiny model of ``family`` (a fresh object: from_config mutates the config it gets)."""
    import transformers

    cls_name, extra = _CONFIGS[family]
    return getattr(transformers, cls_name)(**{**_COMMON, **extra, **overrides})


def build_tiny_model(family: str = "llama", *, seed: int = 0, **overrides):
    """A tiny randomly initialised causal LM in eval mode, fp32, on CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(tiny_config(family, **overrides)))
    return model.eval()


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model("qwen3", seed=1)`` -> a fresh tiny model (each call builds a new one)."""
    return build_tiny_model


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is ~10x faster than oversubscribed ones.

    Use per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained in milliseconds on a few sentences: any text encodes, nothing downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    corpus = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 5
    corpus += ["The pass key is 71432. Remember it. What is the special magic number for the key?"] * 3
    corpus += ["Return the value of the object, or raise an error if the argument is not a string."] * 3
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi`` (``monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)``): records
    each upload's repo, commit message, model card and config instead of talking to the Hub."""

    uploads: list[dict] = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        import huggingface_hub

        FakeHub.created = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        pass

    def upload_folder(self, **kwargs):
        from pathlib import Path

        folder = Path(kwargs["folder_path"])
        FakeHub.uploads.append(dict(kwargs, card=(folder / "README.md").read_text(),
                                    config=(folder / "config.json").read_text()))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/{len(FakeHub.uploads)}"


@pytest.fixture
def fake_hub(monkeypatch):
    """The HfApi stand-in, with its record of uploads cleared."""
    import huggingface_hub

    FakeHub.uploads = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub
