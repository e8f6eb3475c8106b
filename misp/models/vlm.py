"""Loading and saving the VLM: a pretrained VLM of a registered family (optionally 4-bit) or the tiny
Shapes LLaVA, plus LoRA.

A path is matched to its family (``misp.models.families``) from ``config.json`` before any weight loads,
and an unsupported one is refused in one line naming the supported families. Loading goes through
``AutoModelForImageTextToText`` and ``AutoProcessor``; 4-bit leaves the family's vision tower and
projector/merger (and the LM head) unquantised. Both kinds go through ``from_pretrained`` wherever
quantisation is involved: a 4-bit tiny model is saved to a temporary folder and loaded back with a
``BitsAndBytesConfig``, so the tests exercise bitsandbytes exactly as a LLaVA-1.5-7B run does.

``save_vlm`` writes a folder that ``load_vlm(VLMSpec(path=...))`` loads:

- a plain or merged model: the Hugging Face layout (``config.json``, safetensors, processor files);
- with ``merge_lora=False`` (or a 4-bit base, which cannot be merged): the base without LoRA in the same
  layout plus the adapter in ``adapter/`` (peft's layout), attached again on load.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig, ProcessorMixin

from misp.errors import CheckpointError
from misp.models.families import LANGUAGE_MODEL_PROJECTIONS, ModelFamily, family_for_path
from misp.models.quantized import keep_4bit_trainable
from misp.models.tokenizer import read_vocabulary
from misp.testing.tiny_llava import TinyLlavaConfig, build_tiny_llava

log = logging.getLogger(__name__)

ADAPTER_SUBDIR = "adapter"
"""Folder of a saved VLM holding its unmerged LoRA adapter (peft's ``adapter_config.json`` layout)."""

_BNB_BLOCK = 64
_BNB_BLOCKED_SIZES = ("vision_hidden_size", "text_hidden_size", "text_intermediate_size")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



def _dtype(name: str, what: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{what} must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


@dataclass
class LoraSpec:
    """LoRA adapters on the language model (peft ``LoraConfig``)."""

    r: int = 64
    """Rank of each adapter."""
    alpha: int = 128
    """Scaling numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.05
    """Dropout on the adapter input during training."""
    target_modules: str | list[str] = LANGUAGE_MODEL_PROJECTIONS
    """Modules to adapt: a regex over full module names (peft fullmatch) or a list of name suffixes.
    The default takes the language model's q/k/v/o/gate/up/down projections and nothing in the vision
    tower or projector."""
    bias: str = "none"
    """Which biases train: 'none', 'all' or 'lora_only'."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise ValueError(f"LoRA needs r >= 1 and alpha > 0, got r={self.r}, alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoRA bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.target_modules, str):
            re.compile(self.target_modules)

    def to_peft(self):
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            task_type="CAUSAL_LM",
        )


@dataclass
class VLMSpec:
    """Which VLM to load and how: a pretrained VLM of a supported family (``path``) or the tiny Shapes
    LLaVA (``tiny``)."""

    path: str | None = None
    """Hugging Face hub id (e.g. llava-hf/llava-1.5-7b-hf or Qwen/Qwen2.5-VL-7B-Instruct, read from the
    local cache: HF_HUB_OFFLINE) or a local folder written by ``save_vlm`` / ``save_pretrained``. Exactly one of path and tiny."""
    tiny: TinyLlavaConfig | None = None
    """Build the tiny randomly initialised LLaVA with these sizes. Exactly one of path and tiny."""
    vocabulary: str | None = None
    """World folder or world.json whose "vocabulary" makes the tiny model's word tokenizer (tiny only)."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16 (of the unquantised parts when 4-bit)."""
    load_in_4bit: bool = False
    """Quantise the linear layers to 4 bits with bitsandbytes (QLoRA)."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit data type: nf4 or fp4."""
    bnb_4bit_compute_dtype: str | None = None
    """Dtype of the 4-bit matmuls; None uses ``dtype``."""
    bnb_4bit_quant_storage: str | None = None
    """Storage dtype of the packed 4-bit weights; FSDP needs it equal to ``dtype`` (e.g. bfloat16) so
    that all parameters flatten together. None keeps bitsandbytes' uint8."""
    bnb_4bit_use_double_quant: bool = True
    """Quantise the quantisation constants too (saves about 0.4 bits per parameter)."""
    lora: LoraSpec | None = None
    """Add trainable LoRA adapters (the base is frozen); None trains or evaluates the model as loaded."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant) to save memory."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager or flash_attention_2."""
    device_map: str | None = None
    """Passed to ``from_pretrained`` for single-process inference (e.g. "auto"); leave None under
    Lightning, which places the model itself. A 4-bit model on GPUs with None is loaded onto this
    process's own GPU (``LOCAL_RANK``), as FSDP and DDP need."""
    adapter: str | None = None
    """A LoRA adapter folder (peft layout) to attach after loading ``path``, e.g. the ``adapter/`` of a
    4-bit run, attached to the unquantised base to merge it. Trainable when ``lora`` is set."""
    min_pixels: int | None = None
    """Dynamic-resolution families (Qwen2.5-VL): the smallest image area in pixels after resizing; None keeps
    the checkpoint's (3136 = 56x56 for Qwen2.5-VL). With max_pixels it bounds each image's tokens to about
    area / 784."""
    max_pixels: int | None = None
    """Dynamic-resolution families: the largest image area in pixels after resizing (e.g. 1003520 =
    1280 x 28 x 28 caps an image at 1280 tokens); None keeps the checkpoint's (12845056 for Qwen2.5-VL)."""
    extra: dict = field(default_factory=dict)
    """Further keyword arguments for ``from_pretrained`` (e.g. revision, cache_dir)."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("VLMSpec needs exactly one of path (a pretrained model) and tiny (the Shapes model)")
        if self.tiny is not None and self.vocabulary is None:
            raise ValueError("VLMSpec(tiny=...) needs vocabulary: the world folder or world.json for the tokenizer")
        if self.path is not None and self.vocabulary is not None:
            raise ValueError("VLMSpec.vocabulary is only read for the tiny model; a pretrained path has its tokenizer")
        _dtype(self.dtype, "dtype")
        if self.bnb_4bit_compute_dtype is not None:
            _dtype(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype")
        if self.bnb_4bit_quant_storage is not None:
            _dtype(self.bnb_4bit_quant_storage, "bnb_4bit_quant_storage")
            if self.bnb_4bit_quant_storage != self.dtype:
                raise ValueError(
                    f"bnb_4bit_quant_storage={self.bnb_4bit_quant_storage} differs from dtype={self.dtype}; the "
                    "storage dtype exists so that FSDP sees one dtype for all parameters, so set both alike"
                )
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"VLMSpec.{name} must be positive, got {getattr(self, name)}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"VLMSpec.min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if self.tiny is not None and (self.min_pixels or self.max_pixels):
            raise ValueError("VLMSpec.min_pixels/max_pixels apply to dynamic-resolution families; the tiny LLaVA has a fixed size")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}")

    def quantization_config(self, family: ModelFamily | None = None) -> BitsAndBytesConfig | None:
        """The ``BitsAndBytesConfig`` for 4-bit loading, or None; ``family``'s vision tower, projector and
        LM head stay in ``dtype``."""
        if not self.load_in_4bit:
            return None
        kwargs = {}
        if family is not None:
            # Each name as itself (older transformers match a substring) and as a regex anywhere in the tree
            # (newer ones match from the start of the full name, so "visual" alone misses "model.visual...").
            kwargs["llm_int8_skip_modules"] = [p for n in family.unquantized_modules for p in (n, rf".*\.{n}")]
        if self.bnb_4bit_quant_storage is not None:
            kwargs["bnb_4bit_quant_storage"] = _DTYPES[self.bnb_4bit_quant_storage]
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=_DTYPES[self.bnb_4bit_compute_dtype or self.dtype],
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            **kwargs,
        )


def is_quantized(model: nn.Module) -> bool:
    """Whether the (possibly peft-wrapped) model holds bitsandbytes 4-bit or 8-bit layers."""
    base = unwrap_peft(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself when not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _looks_like_local_path(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else (absolute, ./, ~, deeper) names a folder.
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or (os.sep != "/" and os.sep in path)


def _missing_path_error(path: str, cause: Exception | None = None) -> FileNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    hint = (
        "HF_HUB_OFFLINE is set, so nothing is downloaded: download the weights first "
        f"(`huggingface-cli download {path}` on a machine with internet) or point path at a local folder"
        if offline
        else "check the hub id, your network and HF_TOKEN, or point path at a local folder"
    )
    msg = f"VLM path {path!r} is neither a local folder nor a loadable Hugging Face model; {hint}"
    if cause is not None:
        msg += f" (cause: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
    return FileNotFoundError(msg)


def _from_pretrained(path: str, spec: VLMSpec) -> tuple[nn.Module, ProcessorMixin]:
    local = os.path.isdir(os.path.expanduser(path))
    if not local and _looks_like_local_path(path):
        raise _missing_path_error(path)
    path = os.path.expanduser(path) if local else path
    hub_kwargs = {k: v for k, v in spec.extra.items() if k in ("revision", "cache_dir")}
    try:
        family = family_for_path(path, **hub_kwargs)  # before any weight loads: refuses unknown families
    except OSError as e:
        raise _missing_path_error(path, e) from e
    kwargs = dict(spec.extra)
    kwargs.update(dtype=_DTYPES[spec.dtype], attn_implementation=spec.attn_implementation)
    if spec.device_map is not None:
        kwargs["device_map"] = spec.device_map
    quant = spec.quantization_config(family)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if spec.device_map is None and torch.cuda.is_available():
            # bitsandbytes quantises while loading, onto the device it is given (cuda:0 by default). Under
            # FSDP/DDP every process must hold its copy on its own GPU, so place it by the local rank.
            kwargs["device_map"] = {"": torch.device("cuda", local_rank())}
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = AutoProcessor.from_pretrained(path, **hub_kwargs, **_pixel_bounds(spec, family))
    except Exception as e:
        if "Weights only load failed" in str(e) or isinstance(e, pickle.UnpicklingError):
            files = sorted(p.name for p in Path(path).glob("*.bin")) if local else []
            raise CheckpointError(
                f"model {path}: {', '.join(files) or 'a weights file'} holds objects other than tensors, so misp will "
                "not unpickle it (weights_only=True); it was not written by misp or transformers: re-export the "
                "model, preferably as safetensors"
            ) from None
        if not isinstance(e, OSError):
            raise
        if local:
            raise OSError(f"could not load a {family.name} model and processor from the folder {path}: {e}") from e
        raise _missing_path_error(path, e) from e
    return model, processor


def _pixel_bounds(spec: VLMSpec, family: ModelFamily) -> dict[str, int]:
    bounds = {k: getattr(spec, k) for k in ("min_pixels", "max_pixels") if getattr(spec, k) is not None}
    if bounds and not family.dynamic_resolution:
        raise ValueError(f"VLMSpec {sorted(bounds)}: a {family.name} model takes images of one fixed size; leave them unset")
    return bounds


def local_rank() -> int:
    """This process's GPU index on its node, as launchers set it (torchrun, Lightning, SLURM); 0 alone."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _set_attn(model: nn.Module, implementation: str) -> None:
    if getattr(model.config, "_attn_implementation", None) == implementation:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


def _enable_checkpointing(model: nn.Module) -> None:
    # Non-reentrant: no need to force requires_grad on the inputs, and it works with frozen bases.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _prepare_quantized_for_training(model: nn.Module, spec: VLMSpec) -> None:
    if spec.bnb_4bit_quant_storage is None:
        from peft import prepare_model_for_kbit_training

        # Freezes the base, upcasts the few unquantised (norm, embedding) weights to float32 for stable
        # training, and turns on checkpointing only when asked.
        with _quiet_peft():
            prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=spec.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    else:
        # The float32 upcast would break FSDP's single storage dtype (the reason quant_storage is set),
        # so only freeze and checkpoint, as the QLoRA-with-FSDP recipes do.
        for p in model.parameters():
            p.requires_grad_(False)
        if spec.gradient_checkpointing:
            _enable_checkpointing(model)


@contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft calls transformers' `*gradient_checkpointing*` names, deprecated in 5.2x: the warning is theirs.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*", category=FutureWarning)
        yield


def load_vlm(spec: VLMSpec) -> tuple[nn.Module, ProcessorMixin]:
    """Build or load the VLM and its processor as ``spec`` says, with LoRA when ``spec.lora`` is set.

    Returns:
        ``(model, processor)``; the model is the family's transformers class (``LlavaForConditionalGeneration``,
        ``Qwen2_5_VLForConditionalGeneration``, ...) or, with LoRA or an adapter, a peft ``PeftModel`` around one.
    """
    if spec.tiny is not None:
        if spec.load_in_4bit:
            odd = {n: getattr(spec.tiny, n) for n in _BNB_BLOCKED_SIZES if getattr(spec.tiny, n) % _BNB_BLOCK}
            if odd:
                raise ValueError(
                    f"4-bit tiny LLaVA: {odd} must be multiples of {_BNB_BLOCK}; bitsandbytes quantises weights in "
                    f"blocks of {_BNB_BLOCK} inputs (its CPU kernels need whole blocks per row)"
                )
        model, processor = build_tiny_llava(read_vocabulary(spec.vocabulary), spec.tiny)
        if spec.load_in_4bit:
            # Through from_pretrained, so the 4-bit layers are made exactly as for a hub checkpoint.
            with tempfile.TemporaryDirectory(prefix="misp-tiny-llava-") as tmp:
                model.save_pretrained(tmp)
                processor.save_pretrained(tmp)
                model, processor = _from_pretrained(tmp, spec)
        else:
            model.to(_DTYPES[spec.dtype])
            _set_attn(model, spec.attn_implementation)
        adapter = spec.adapter
    else:
        model, processor = _from_pretrained(spec.path, spec)
        adapter = spec.adapter
        saved_adapter = Path(os.path.expanduser(spec.path)) / ADAPTER_SUBDIR
        if adapter is None and saved_adapter.is_dir():
            # An export's adapter/ folder without its config would otherwise load as the plain base, silently.
            if not (saved_adapter / "adapter_config.json").is_file():
                raise CheckpointError(f"export {spec.path}: its adapter folder {saved_adapter} lacks adapter_config.json, "
                                      "so the trained LoRA cannot be loaded (only the untrained base would be); "
                                      "restore the file or export the run again")
            adapter = str(saved_adapter)

    trainable = spec.lora is not None
    if trainable and is_quantized(model):
        _prepare_quantized_for_training(model, spec)
        keep_4bit_trainable(model)  # else a CPU eval pass would cut the backward through 4-bit layers
    elif spec.gradient_checkpointing:
        _enable_checkpointing(model)

    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {adapter!r} has no adapter_config.json (not a peft LoRA folder)")
        if trainable:
            log.info("continuing to train the LoRA adapter in %s (its own rank and alpha; spec.lora's are unused)", adapter)
        try:
            with _quiet_peft():
                model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
        except RuntimeError as e:
            if "size mismatch" not in str(e):
                raise
            detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
            raise CheckpointError(f"adapter {adapter}: made for a base of another width than {spec.path or 'the tiny model'} "
                                  f"({detail[:300]})") from None
    elif trainable:
        from peft import get_peft_model

        with _quiet_peft():
            model = get_peft_model(model, spec.lora.to_peft())
    return model, processor


@contextmanager
def without_lora(base: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put each LoRA-wrapped layer's original layer back in its place, then restore the LoRA ones.

    Inside, ``base`` has exactly the module tree (and state-dict keys) of the model before LoRA, 4-bit
    layers included, so transformers serialises it as it would the plain model. Only module references
    move: no weight is touched.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    swapped: list[str] = []
    for name, module in base.named_modules():
        if not isinstance(module, BaseTunerLayer) or any(name.startswith(f"{s}.") for s in swapped):
            continue
        parent_name, _, child = name.rpartition(".")
        swaps.append((base.get_submodule(parent_name) if parent_name else base, child, module))
        swapped.append(name)
    try:
        for parent, child, module in swaps:
            setattr(parent, child, module.get_base_layer())
        yield base
    finally:
        for parent, child, module in swaps:
            setattr(parent, child, module)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``base + LoRA`` under the base model's own keys, without modifying ``model``.

    Each adapted weight becomes ``W + (alpha/r) B A``, summed in float32 and stored in ``W``'s dtype; the
    live model keeps training with its adapters unmerged.
    """
    from peft.tuners.lora import LoraLayer

    base = unwrap_peft(model)
    deltas: dict[str, list[torch.Tensor]] = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:
            continue  # a merged layer's base weight already holds its delta
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if module.use_dora.get(adapter, False) or getattr(module, "lora_bias", {}).get(adapter, False):
                raise ValueError(f"{name}: merging DoRA or LoRA-bias adapters is not supported by save_vlm")
            deltas.setdefault(f"{name}.weight", []).append(module.get_delta_weight(adapter).detach().float().cpu())
    with without_lora(base):
        state = dict(base.state_dict())
    for key, ds in deltas.items():
        w = state[key]
        state[key] = (w.detach().float().cpu() + sum(ds)).to(w.dtype)
    return state


def save_vlm(model: nn.Module, processor: ProcessorMixin, out_dir: str | os.PathLike, merge_lora: bool = True) -> Path:
    """Write ``model`` and ``processor`` to ``out_dir`` so that ``load_vlm(VLMSpec(path=out_dir))`` loads them.

    Args:
        model: a LLaVA model, possibly peft-wrapped and/or 4-bit.
        processor: its processor.
        out_dir: the folder (created if missing).
        merge_lora: fold LoRA into the base weights (one plain model); False keeps the base and the
            adapter apart (``out_dir/adapter``). A 4-bit base cannot be merged (the result would carry the
            quantisation error, and 4-bit weights cannot hold a dense update): it is saved unmerged with a
            warning; to merge, load the unquantised base with ``VLMSpec(path=<base>, adapter=<out_dir>/adapter)``
            and save that with ``merge_lora=True``.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = unwrap_peft(model)
    is_peft = base is not model
    if is_peft and merge_lora and is_quantized(model):
        msg = (
            "save_vlm: merging LoRA needs the unquantised base, and this base is 4-bit; saving the 4-bit base "
            f"and the adapter ({out / ADAPTER_SUBDIR}) unmerged instead. To merge: load_vlm(VLMSpec(path=<the "
            f"unquantised base>, adapter='{out / ADAPTER_SUBDIR}')) then save_vlm(..., merge_lora=True)"
        )
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        merge_lora = False

    stale_adapter = out / ADAPTER_SUBDIR
    if (not is_peft or merge_lora) and stale_adapter.exists():
        # An adapter left by an earlier unmerged save would be attached on load: remove it.
        shutil.rmtree(stale_adapter)
    if not is_peft:
        model.save_pretrained(out)
    elif merge_lora:
        merged = merged_state_dict(model)
        with without_lora(base):
            base.save_pretrained(out, state_dict=merged)
    else:
        # transformers serialises 4-bit layers itself (ignoring a passed state dict), so hand it the base's
        # own module tree rather than a filtered state dict.
        with without_lora(base):
            base.save_pretrained(out)
        # Embeddings are never resized here, so peft need not look up the base config (offline, or a
        # deleted temporary folder for the tiny 4-bit model).
        model.save_pretrained(out / ADAPTER_SUBDIR, save_embedding_layers=False)
    processor.save_pretrained(out)
    return out


def _save_adapter_state(model: nn.Module, state: dict, out: Path) -> None:
    """peft's adapter folder from a gathered state dict, written directly.

    peft's ``save_pretrained(state_dict=...)`` picks the adapter's keys by the live model's module names,
    which FSDP1 has renamed (``_fsdp_wrapped_module``): it would write an empty adapter. peft's own file
    layout is simple: the LoRA keys without the adapter name, and the adapter's config.
    """
    from safetensors.torch import save_file

    (name,) = model.peft_config.keys() if len(model.peft_config) == 1 else (model.active_adapter,)
    weights = {k.replace(f".{name}.", "."): v.detach().contiguous() for k, v in state.items() if "lora_" in k}
    if not weights:
        raise ValueError("the gathered state holds no LoRA weights: nothing to export as an adapter")
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[name].save_pretrained(str(out))


def save_vlm_state(model: nn.Module, processor: ProcessorMixin, out_dir: str | os.PathLike, state: dict) -> Path:
    """Write a model trained sharded, from its gathered full ``state`` (see ``gather_full_state_dict``).

    A LoRA model saves only its adapter (``out_dir/adapter``): the frozen base is the one it was loaded
    from, so ``load_vlm(VLMSpec(path=<that base>, adapter=<out_dir>/adapter))`` restores it, and merging
    (which needs every base weight on one process) is left to that unsharded load. A full fine-tune is
    saved whole, loadable with ``VLMSpec(path=out_dir)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = unwrap_peft(model)
    if base is not model:
        _save_adapter_state(model, state, out / ADAPTER_SUBDIR)
    else:
        model.save_pretrained(out, state_dict=state)
    processor.save_pretrained(out)
    return out
