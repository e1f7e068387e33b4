"""vLLM renderer for tokenizer mode `pmod`: vLLM's HF renderer plus one check.

`<image>` markers become placeholder tokens just past the text vocabulary; the multimodal
processor expands one per image. A prompt with more (or fewer) markers than images would leave
out-of-vocabulary ids in the prompt, which must never reach the model: refuse it here, as a
clear 400, before it enters the engine.

The check runs before the multimodal processor: the processor records each image in vLLM's
processor cache, and a request refused after that must not leave a record behind (see
`pmod_serve.entrypoints.serving_config`). It is repeated on the processed prompt as a safety net.
"""

from __future__ import annotations

from vllm.renderers.hf import HfRenderer


class PmodRenderer(HfRenderer):
    def _process_tokens(self, prompt, *, skip_mm_cache: bool = False):
        self._check_markers_before_processing(prompt)
        return self._check_image_markers(super()._process_tokens(prompt, skip_mm_cache=skip_mm_cache))

    async def _process_tokens_async(self, prompt, *, skip_mm_cache: bool = False):
        self._check_markers_before_processing(prompt)
        engine_input = await super()._process_tokens_async(prompt, skip_mm_cache=skip_mm_cache)
        return self._check_image_markers(engine_input)

    def _check_markers_before_processing(self, prompt) -> None:
        image_token_id = getattr(self.get_tokenizer(), "pmod_image_token_id", None)
        if image_token_id is None:
            return
        markers = sum(1 for token in prompt["prompt_token_ids"] if token == image_token_id)
        images = 0
        if mm_data := prompt.get("multi_modal_data"):
            images = self.get_mm_processor().info.parse_mm_data(mm_data).get_count("image", strict=False)
        if markers != images:
            raise ValueError(_marker_message(markers, images))

    def _check_image_markers(self, engine_input):
        image_token_id = getattr(self.get_tokenizer(), "pmod_image_token_id", None)
        if image_token_id is None:
            return engine_input
        placeholders = sum(1 for token in engine_input["prompt_token_ids"] if token == image_token_id)
        ranges = (engine_input.get("mm_placeholders") or {}).get("image", [])
        expected = sum(r.length for r in ranges)
        if placeholders != expected:
            # Each image's marker was expanded to its visual tokens; every other marker is one token.
            markers = len(ranges) + placeholders - expected
            raise ValueError(_marker_message(markers, len(ranges)))
        return engine_input


def _marker_message(markers: int, images: int) -> str:
    return (
        f"the prompt has {markers} '<image>' marker(s) but {images} image(s) were given; "
        "use exactly one '<image>' per image (chat requests insert them for image parts: "
        "do not write '<image>' in the text)"
    )
