"""Chat messages -> the engine prompt: rendered text plus, for vision-language models, images.

Chat requests are rendered with `kore_ray.data.tokenize.render`, the function training uses, so a
template-less base model (the embedded Gemma) sees exactly the Question/Answer text it was trained
on. The rendered text already holds the template's BOS token, so it is tokenised without special
tokens. Images travel as data: URLs only: the server never fetches a URL a client names.
"""

from __future__ import annotations

import base64
import binascii
import io

from jinja2 import TemplateError

from kore_ray.data.tokenize import render
from kore_ray.serve.protocol import APIError, ChatMessage

MAX_IMAGE_BYTES = 20 << 20


def decode_image(url: str):
    """A `data:image/...;base64,...` URL -> an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    head, sep, data = url.partition(",")
    if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
        raise APIError(400, "image_url must be a base64 data URL (data:image/...;base64,...); "
                            "the server does not fetch remote images", param="messages")
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise APIError(400, f"image larger than {MAX_IMAGE_BYTES >> 20} MiB", param="messages")
    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
        raise APIError(400, f"image_url is not a readable image: {e}", param="messages") from None


def chat_prompt(tokenizer, messages: list[ChatMessage], accepts_images: bool) -> dict:
    """The engine prompt for a chat request: {"prompt": text[, "multi_modal_data": images]}.

    Image parts become the template's image placeholders ({"type": "image"}, the Hugging Face
    convention) and their pixels go to vLLM as multi_modal_data, in message order.
    """
    images, rendered = [], []
    for m in messages:
        if isinstance(m.content, str):
            rendered.append({"role": m.role, "content": m.content})
            continue
        parts = []
        for part in m.content:
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                if not accepts_images:
                    raise APIError(400, "this model does not accept images", param="messages")
                images.append(decode_image(part.image_url.url))
                parts.append({"type": "image"})
        rendered.append({"role": m.role, "content": parts})
    try:
        text = render(tokenizer, rendered, add_generation_prompt=True)
    except TemplateError as e:  # a model's own template may refuse a conversation (role order)
        raise APIError(400, f"the chat template refused these messages: {e}",
                       param="messages") from None
    prompt = {"prompt": text}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    return prompt
