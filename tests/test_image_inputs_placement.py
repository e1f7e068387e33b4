"""Where vLLM puts the image inputs the model receives. The image sizes must stay on the CPU:
`embed_multimodal` reads them as Python ints, and reading a device copy waits for the GPU to
finish everything queued before it, in every step that encodes an image (on an H200 at
concurrency 256: 13-26 ms of host time per step, during which the async scheduler's lead was
lost; `benchmarks/results/c256_profile/`). The batching below is vLLM's own, as its model runner
calls it, with `meta` standing in for the GPU."""

from __future__ import annotations

from conftest import make_image, vicuna_prompt
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.utils import group_and_batch_mm_kwargs


def test_image_sizes_stay_on_the_cpu_and_pixels_go_to_the_device(llm_two_images_per_step):
    model_config = llm_two_images_per_step.llm_engine.vllm_config.model_config
    processor = MULTIMODAL_REGISTRY.create_processor(model_config)
    # Two images with different crop counts (their pixels batch as a list) and one alone (stacked).
    for images in ([make_image(672, 672, 1), make_image(400, 300, 2)], [make_image(336, 336, 3)]):
        hf_inputs = processor._call_hf_processor(vicuna_prompt("Describe.", len(images)), {"images": images}, {}, {})
        items = MultiModalKwargsItems.from_hf_inputs(hf_inputs, processor._get_mm_fields_config(hf_inputs, {}))
        ((modality, count, batch),) = group_and_batch_mm_kwargs(
            [("image", item) for item in items["image"]], device="meta")
        assert (modality, count) == ("image", len(images))
        assert batch["image_sizes"].device.type == "cpu"
        assert batch["image_sizes"].tolist() == [list(image.size) for image in images]
        pixels = batch["pixel_values"] if isinstance(batch["pixel_values"], list) else [batch["pixel_values"]]
        assert all(tensor.device.type == "meta" for tensor in pixels)
