"""Multi-turn image chat through `pmod-serve` (issue 17): the client resends the whole
conversation, the server's answers included, and turns 2 and 3 reuse the image's KV from the
prefix cache (benchmarks.multiturn's client, the one the GPU benchmark uses)."""

from __future__ import annotations

import pytest

from benchmarks.multiturn import run_conversation, summarise

pytestmark = pytest.mark.engine


def test_later_turns_hit_the_cache_past_the_image(pmod_server) -> None:
    # An image no other test sends, so turn 1 is a cold prefill. Hits are whole blocks (128
    # tokens on CPU) and, past the image, need the original block holding the visual span's end
    # complete in the common prefix: a longer first question puts the span's end well inside it
    # (with a GPU's 16-token blocks a short question does).
    conversation = run_conversation(pmod_server.base_url, "pmod-tiny", seed=9173, turns=3, image_size=(352, 320),
                                    answer_tokens=12, preamble="Look at every part of the picture. " * 30)
    visual_tokens = conversation[0]["deltas"]["pmod_visual_tokens_total"]
    assert visual_tokens > 0
    assert all(turn["ttft_s"] is not None and turn["usage"]["completion_tokens"] == 12 for turn in conversation)
    for turn in conversation[1:]:
        # The hit covers the image and the text after it; the image is not prefilled again.
        assert turn["deltas"]["vllm:prefix_cache_hits_total"] > visual_tokens, turn
        assert turn["deltas"]["pmod_visual_tokens_total"] == 0, turn
    summary = summarise([conversation], 3)
    assert summary["turn2"]["prefix_cache_hit_rate"] > 0.5 and summary["turn1"]["visual_tokens_prefilled"] == visual_tokens
