"""A LLaVA-style vision-language model: frozen vision encoder + projector + decoder LLM.

The prompt is chat-formatted with the tokenizer's own template; the user turn holds an `<image>`
placeholder that is replaced by the projected visual tokens. Alongside the token ids we keep a
token-type mask (1 = vision, 0 = text): the Recursive Connector uses it to pick a per-modality
norm and projection, and the analysis uses it to measure each modality separately.

The decoder always runs through `depthkit.recursive.RecursiveModel` (at R = 1 with no feedback
it is exactly the plain decoder), so looping a VLM is the text-only recursion machinery with a
second modality, not a second implementation.

Two ways to get one:
- `build_vlm`: EfficientNet-Lite0 (ImageNet weights, offline) + a new 2-layer MLP projector + any
  causal LM that depthkit supports (default SmolLM2-135M-Instruct), optionally truncated;
- `from_llava`: a Hugging Face `LlavaForConditionalGeneration` checkpoint, whose vision tower,
  projector and language model are reused as they are, so the same recursion code loops its LLM.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from depthkit.errors import DepthkitError, require
from depthkit.models.adapters import get_adapter
from depthkit.models.loading import DEFAULT_MODEL, load_model, resolve_dtype
from depthkit.recursive import RecursiveConfig, RecursiveModel, truncate_layers
from depthkit.recursive.model import WEIGHTS_FILE, StepOutput
from depthkit.utils.io import atomic_output_dir
from depthkit.utils.precision import dtype_name
from depthkit.vlm.projector import Projector
from depthkit.vlm.vision import FEATURE_DIM, NUM_VISUAL_TOKENS, ImageLike, VisionEncoder, preprocess

IMAGE_PLACEHOLDER = "<image>"
TEXT_TOKEN, VISION_TOKEN = 0, 1
DEFAULT_SYSTEM = "Answer briefly."
IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    """One chat-formatted example: ids (image positions hold a pad id), token types, and labels.

    `labels` follow the Hugging Face convention (equal to `input_ids` on the answer tokens,
    -100 elsewhere, shifted inside the loss), so only the answer is trained and scored.
    """

    input_ids: torch.Tensor
    token_types: torch.Tensor
    labels: torch.Tensor


@dataclass
class VLMBatch:
    """Right-padded examples plus their visual features (B, N, D).

    Right padding needs no attention mask with a causal decoder: real tokens never attend to the
    pads after them, and pads carry no labels. `valid` marks real tokens for statistics.
    """

    input_ids: torch.Tensor
    token_types: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    features: torch.Tensor

    def to(self, device: str | torch.device) -> VLMBatch:
        return VLMBatch(*(t.to(device) for t in (self.input_ids, self.token_types, self.labels, self.valid,
                                                  self.features)))


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    answer: str | None = None,
    num_image_tokens: int = NUM_VISUAL_TOKENS,
    system: str | None = DEFAULT_SYSTEM,
    max_length: int | None = None,
) -> EncodedExample:
    """Chat-format `<image>\\nquestion` (and the answer, if given, closed by the EOS token)."""
    require(IMAGE_PLACEHOLDER not in question, f"the question must not contain {IMAGE_PLACEHOLDER}")
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = prompt.split(IMAGE_PLACEHOLDER, 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    parts = [_ids(tokenizer, before), [pad] * num_image_tokens, _ids(tokenizer, after)]
    types = [[TEXT_TOKEN] * len(parts[0]), [VISION_TOKEN] * num_image_tokens, [TEXT_TOKEN] * len(parts[2])]
    prompt_ids = [i for p in parts for i in p]
    answer_ids = _ids(tokenizer, answer + (tokenizer.eos_token or "")) if answer is not None else []
    ids = prompt_ids + answer_ids
    if max_length is not None and len(ids) > max_length:
        raise DepthkitError(f"the prompt is {len(ids)} tokens long, more than the model's context of {max_length}")
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return EncodedExample(as_long(ids), as_long([t for p in types for t in p] + [TEXT_TOKEN] * len(answer_ids)),
                          as_long(labels))


def answer_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask over positions 0..L-2 that predict an answer token, and those tokens (in mask order)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def collate(examples: Sequence[EncodedExample], features: Sequence[torch.Tensor], pad_id: int) -> VLMBatch:
    """Right-pad a list of examples and stack their image features."""
    length = max(len(e.input_ids) for e in examples)

    def pad(values: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([values, values.new_full((length - len(values),), fill)])

    return VLMBatch(
        input_ids=torch.stack([pad(e.input_ids, pad_id) for e in examples]),
        token_types=torch.stack([pad(e.token_types, TEXT_TOKEN) for e in examples]),
        labels=torch.stack([pad(e.labels, IGNORE_INDEX) for e in examples]),
        valid=torch.stack([pad(torch.ones_like(e.input_ids, dtype=torch.bool), 0) for e in examples]),
        features=torch.stack(list(features)),
    )


NUM_MODALITIES = 2  # text (0) and vision (1): the token-type mask doubles as the connector's modality ids
# The connector recipe benchmarks/recursive_vlm.py measured for the VLM (image and text tokens): it
# differs from the text recipe (`RecursiveConfig`'s defaults) in what sizes the update and its scale.
VLM_CONNECTOR = {"residual": "previous", "scale_init": 0.3, "connector_norm": "embeddings"}
VLM_FILE = "vlm.json"
PROJECTOR_FILE = "projector.safetensors"


class VisionLanguageModel(nn.Module):
    """Encoder (optional: features may be precomputed) + projector + (recursive) causal LM + tokenizer.

    `language_model` is a plain Hugging Face causal LM that depthkit's adapters understand;
    `recursive` loops it (`make_recursive`), fed with this class's input embeddings and its
    token-type mask as modality ids.
    """

    def __init__(self, language_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, projector: nn.Module,
                 encoder: nn.Module | None = None, num_image_tokens: int = NUM_VISUAL_TOKENS,
                 system: str | None = DEFAULT_SYSTEM, spec: dict | None = None) -> None:
        super().__init__()
        get_adapter(language_model)  # refuse unsupported decoders early
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.projector = projector
        self.encoder = encoder
        self.num_image_tokens = num_image_tokens
        self.system = system
        self.spec = dict(spec or {})  # how to rebuild this model (saved next to trained weights)
        self.recursive = RecursiveModel.wrap(language_model, num_loops=1, feedback="vanilla")

    def make_recursive(self, num_loops: int = 3, feedback: str = "connector", modality_specific: bool = True,
                       **options) -> RecursiveModel:
        """Loop the whole decoder; the connector gets one norm+projection per modality unless shared.

        `options` are `RecursiveConfig` fields (e.g. `lora_rank`, `projection`, `scale_init`); the
        connector's default is the VLM recipe (`VLM_CONNECTOR`).
        New modules (connector, LoRA) are float32 and trainable; the base stays frozen.
        """
        if feedback == "connector":
            options = VLM_CONNECTOR | options
            options["num_modalities"] = NUM_MODALITIES if modality_specific else 1
            depth = len(get_adapter(self.language_model).layers(self.language_model))
            options.setdefault("connector_k", min(4, depth))
        self.recursive.adapters.detach()
        self.recursive = RecursiveModel.wrap(self.language_model, num_loops=num_loops, feedback=feedback, **options)
        return self._place_recursion()

    def set_recursive_config(self, config: RecursiveConfig) -> RecursiveModel:
        """Rebuild the recursion from a saved config (before loading its weights)."""
        self.recursive.adapters.detach()
        self.recursive = RecursiveModel(self.language_model, config)
        return self._place_recursion()

    def _place_recursion(self) -> RecursiveModel:
        """Put the new connector and adapters on the LLM's device."""
        return self.recursive.to(_device(self.language_model))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def steps(self, batch: VLMBatch, num_loops: int | None = None) -> Iterator[StepOutput]:
        """Every recursion step's hidden state (undecoded: callers decode only the positions they score)."""
        require(not self.recursive.config.coda, "a recursive VLM loops the whole decoder (no coda layers)")
        yield from self.recursive.iter_steps(inputs_embeds=self.input_embeddings(batch), num_loops=num_loops,
                                             modality_ids=batch.token_types, decode_all=False, logits_to_keep=1)

    def forward(self, batch: VLMBatch, num_loops: int | None = None) -> list[torch.Tensor]:
        """(answer tokens, vocab) logits of every recursion step: what training and scoring read.

        Only answer positions are decoded: the LM head (49k x hidden) over every prompt position
        would cost as much as the decoder and contributes nothing to the loss. Going through
        `forward` lets `accelerate` wrap the model (DDP synchronises gradients in its forward).
        """
        mask, _ = answer_targets(batch.labels)
        return [self.decode(step.hidden[:, :-1][mask]) for step in self.steps(batch, num_loops)]

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (of any subset of positions)."""
        return self.recursive.decode(hidden)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def context_length(self) -> int | None:
        return getattr(self.language_model.config, "max_position_embeddings", None)

    def encode(self, question: str, answer: str | None = None) -> EncodedExample:
        return encode_example(self.tokenizer, question, answer, self.num_image_tokens, self.system,
                              self.context_length)

    def image_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Raw (pre-projector) visual features of images, through the frozen encoder."""
        require(self.encoder is not None, "this model was built without its vision encoder")
        pixels = self.encoder.preprocess(images) if hasattr(self.encoder, "preprocess") else preprocess(images)
        with torch.no_grad():
            return self.encoder(pixels.to(_device(self)))

    def input_embeddings(self, batch: VLMBatch) -> torch.Tensor:
        """Token embeddings with the projected visual tokens written at the image positions."""
        embeddings = get_adapter(self.language_model).embed_tokens(self.language_model)(batch.input_ids)
        visual = self.projector(batch.features).to(embeddings.dtype)
        mask = (batch.token_types == VISION_TOKEN).unsqueeze(-1)
        require(int(mask.sum()) == visual.shape[0] * visual.shape[1],
                "the number of image positions does not match the number of visual tokens")
        return embeddings.masked_scatter(mask, visual)


    @torch.no_grad()
    def answer(self, image: ImageLike, question: str, num_loops: int | None = None,
               max_new_tokens: int = 16) -> str:
        """Greedy answer after `num_loops` loops, decoded with a KV cache.

        The prompt (image + question) is prefilled once; each new token then runs only its own
        position through the R steps, attending to the cached keys/values of every step
        (`RecursiveModel.slot`), instead of re-running the whole prefix per token.
        """
        self.eval()
        device = _device(self.language_model)
        example = self.encode(question)
        unlabelled = torch.full_like(example.input_ids, IGNORE_INDEX)
        prompt = EncodedExample(example.input_ids, example.token_types, unlabelled)
        batch = collate([prompt], [self.image_features([image])[0]], self.pad_id).to(device)
        embeddings, types, cache = self.input_embeddings(batch), batch.token_types, DynamicCache()
        new: list[int] = []
        for _ in range(max_new_tokens):
            *_, last = self.recursive.iter_steps(inputs_embeds=embeddings, num_loops=num_loops, modality_ids=types,
                                                 past_key_values=cache, decode_all=False, logits_to_keep=1)
            token = int(last.logits[0, -1].argmax(-1))
            if token == self.tokenizer.eos_token_id:
                break
            new.append(token)
            next_id = torch.tensor([[token]], device=device)
            embeddings, types = self.recursive.embed(next_id), torch.full_like(next_id, TEXT_TOKEN)
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    # -- persistence ------------------------------------------------------------------------
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Save atomically (see `write_checkpoint`)."""
        with atomic_output_dir(folder, overwrite) as tmp:
            self.write_checkpoint(tmp)
        return Path(folder)

    def write_checkpoint(self, folder: Path) -> None:
        """What was trained (projector, connector, LoRA) + how to rebuild the rest: no base weights copied."""
        meta = {**self.spec, "system": self.system, "num_image_tokens": self.num_image_tokens}
        (folder / VLM_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.projector.state_dict().items()},
                  str(folder / PROJECTOR_FILE))
        self.recursive.config.save(folder)
        save_file(self.recursive.extra_state_dict(), str(folder / WEIGHTS_FILE))


def load_vlm(folder: str | Path, device: str = "cpu", with_encoder: bool = True) -> VisionLanguageModel:
    """Rebuild a saved VLM (base LLM from its source, then the trained weights on top)."""
    folder = Path(folder)
    require((folder / VLM_FILE).is_file(), f"{folder} is not a depthkit VLM checkpoint (no {VLM_FILE})")
    meta = json.loads((folder / VLM_FILE).read_text())
    if meta.get("kind") == "llava":
        require(meta.get("model") is not None, f"{folder}: the LLaVA source of this checkpoint is unknown")
        vlm = from_llava(meta["model"], dtype=meta.get("dtype", "auto"), system=meta.get("system"), device=device)
    else:
        vlm = build_vlm(meta["model"], meta.get("num_layers"), meta.get("dtype", "auto"), device,
                        with_encoder, meta.get("system"))
    vlm.projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))
    recursive = vlm.set_recursive_config(RecursiveConfig.load(folder))
    recursive.load_extra_state(load_file(str(folder / WEIGHTS_FILE)))
    return vlm.eval()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# -- builders --------------------------------------------------------------------------------

def embedding_norm(model: PreTrainedModel) -> float:
    """Mean norm of the LLM's token embeddings: the scale visual tokens should start at."""
    weight = get_adapter(model).embed_tokens(model).weight
    return float(weight.float().norm(dim=-1).mean())


def build_vlm(
    model_name: str = DEFAULT_MODEL,
    num_layers: int | None = None,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    with_encoder: bool = True,
    system: str | None = DEFAULT_SYSTEM,
) -> VisionLanguageModel:
    """EfficientNet-Lite0 + a fresh projector + the named causal LM (first `num_layers` blocks)."""
    language_model, tokenizer = load_model(model_name, dtype, device)
    if num_layers is not None:
        truncate_layers(language_model, num_layers)
    language_model.requires_grad_(False)
    # float32 even on a bfloat16 LLM: bf16 weights cannot hold small Adam updates
    projector = Projector(FEATURE_DIM, language_model.config.hidden_size).to(device)
    encoder = VisionEncoder().to(device) if with_encoder else None
    spec = {"kind": "efficientnet-lite0", "model": model_name, "num_layers": num_layers,
            "dtype": dtype_name(language_model.dtype)}
    return VisionLanguageModel(language_model, tokenizer, projector, encoder, NUM_VISUAL_TOKENS, system, spec)


# -- Hugging Face LLaVA checkpoints ----------------------------------------------------------

class LlavaVisionEncoder(nn.Module):
    """A LLaVA vision tower with its feature-layer selection (the part before the projector)."""

    def __init__(self, llava: nn.Module) -> None:
        super().__init__()
        self.tower = llava.model.vision_tower
        self.feature_layer = llava.config.vision_feature_layer
        self.strategy = llava.config.vision_feature_select_strategy
        self.image_size = llava.config.vision_config.image_size

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        states = self.tower(pixels.to(next(self.tower.parameters()).dtype), output_hidden_states=True,
                            return_dict=True).hidden_states
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        selected = [states[i][:, 1:] if self.strategy == "default" else states[i] for i in layers]
        return torch.cat(selected, dim=-1)

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return preprocess(images, crop_size=self.image_size, short_side=self.image_size)

    def num_tokens(self) -> int:
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.image_size, self.image_size)
            return self(probe.to(next(self.tower.parameters()).device)).shape[1]


def llava_language_model(llava: nn.Module) -> PreTrainedModel:
    """A causal-LM view of a LLaVA model's decoder, sharing its weights (no copy).

    depthkit's adapters and the recursion code expect `model.model.layers` and `model.lm_head`;
    LLaVA keeps them at `model.model.language_model` and `model.lm_head`. We build the causal-LM
    class of the text config on the meta device (no memory) and plug LLaVA's modules into it.
    """
    text_config = llava.config.text_config
    with torch.device("meta"):
        view = AutoModelForCausalLM.from_config(text_config)
    view.model = llava.model.language_model
    view.lm_head = llava.lm_head
    get_adapter(view)
    return view.eval()


def from_llava(llava_or_path: nn.Module | str, tokenizer: PreTrainedTokenizerBase | None = None,
               dtype: str | torch.dtype = "auto", system: str | None = DEFAULT_SYSTEM,
               device: str = "cpu") -> VisionLanguageModel:
    """Wrap a `LlavaForConditionalGeneration` (object or checkpoint folder/hub id) as a depthkit VLM."""
    llava = llava_or_path
    if isinstance(llava_or_path, (str, Path)):
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        try:
            llava = LlavaForConditionalGeneration.from_pretrained(str(llava_or_path),
                                                                  dtype=resolve_dtype(dtype, device))
            llava.to(device).eval()
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(llava_or_path))
        except (OSError, ValueError) as err:
            raise DepthkitError(f"could not load LLaVA checkpoint '{llava_or_path}': {err}") from err
    require(getattr(llava.config, "model_type", None) == "llava",
            f"expected a LLaVA checkpoint (model_type 'llava'), got '{getattr(llava.config, 'model_type', None)}'")
    require(tokenizer is not None, "a tokenizer is needed with a LLaVA model object")
    encoder = LlavaVisionEncoder(llava)
    language_model = llava_language_model(llava)
    language_model.requires_grad_(False)
    encoder.requires_grad_(False)
    spec = {"kind": "llava", "model": str(llava_or_path) if isinstance(llava_or_path, (str, Path)) else None,
            "dtype": dtype_name(language_model.dtype)}
    return VisionLanguageModel(language_model, tokenizer, llava.model.multi_modal_projector, encoder,
                               encoder.num_tokens(), system, spec)
