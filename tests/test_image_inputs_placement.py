"""Where vLLM puts the image inputs the model receives. The image sizes must stay on the CPU:
`embed_multimodal` reads them as Python ints, and reading a device copy waits for the GPU to
finish everything queued before it, in every step that encodes an image (on an H200 at
concurrency 256: 13-26 ms of host time per step, during which the async scheduler's lead was
lost; `benchmarks/results/c256_profile/`). The pixels of a step's images must reach the device as
one tensor, whatever their crop counts: vLLM batches such a field into one pinned buffer (one
asynchronous copy), but hands images it cannot stack as a list of separate copies from pageable
memory, each of which may wait for the GPU. The batching below is vLLM's own, as its model
runner calls it, with `meta` standing in for the GPU."""

from __future__ import annotations

import torch
from conftest import make_image, vicuna_prompt
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.utils import group_and_batch_mm_kwargs

from pmod_serve.pmod.image_layout import num_crops


def test_image_sizes_stay_on_the_cpu_and_pixels_go_to_the_device(llm_two_images_per_step):
    model_config = llm_two_images_per_step.llm_engine.vllm_config.model_config
    processor = MULTIMODAL_REGISTRY.create_processor(model_config)
    layout = processor.info.image_layout
    # Two images with different crop counts, and one alone.
    for images in ([make_image(672, 672, 1), make_image(400, 300, 2)], [make_image(336, 336, 3)]):
        hf_inputs = processor._call_hf_processor(vicuna_prompt("Describe.", len(images)), {"images": images}, {}, {})
        items = MultiModalKwargsItems.from_hf_inputs(hf_inputs, processor._get_mm_fields_config(hf_inputs, {}))
        ((modality, count, batch),) = group_and_batch_mm_kwargs(
            [("image", item) for item in items["image"]], device="meta")
        assert (modality, count) == ("image", len(images))
        assert batch["image_sizes"].device.type == "cpu"
        assert batch["image_sizes"].tolist() == [list(image.size) for image in images]
        pixels = batch["pixel_values"]
        crops = sum(num_crops(*image.size, layout) for image in images)
        assert isinstance(pixels, torch.Tensor) and pixels.device.type == "meta"
        assert tuple(pixels.shape) == (crops, 3, layout.crop_size, layout.crop_size)
