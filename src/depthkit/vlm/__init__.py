"""A LLaVA-style vision-language model looped with depthkit's recursion machinery (RecursiveVLM).

`build_vlm` (EfficientNet-Lite0 + projector + a supported causal LM) or `from_llava` (a Hugging
Face LLaVA checkpoint) give a `VisionLanguageModel`; `make_recursive` loops its decoder with the
Recursive Connector, one norm+projection per modality selected by the token-type mask.
"""

from depthkit.vlm.model import VisionLanguageModel, build_vlm, from_llava, load_vlm

__all__ = ["VisionLanguageModel", "build_vlm", "from_llava", "load_vlm"]
