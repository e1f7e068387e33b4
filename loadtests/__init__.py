"""Load tests for pmod-serve (or any OpenAI-compatible endpoint): realistic image-chat traffic.

`python -m loadtests --base-url URL --model NAME --requests N --concurrency C --json OUT` measures
one deployment; `python -m loadtests compare A.json B.json` puts two reports side by side.
Built on vLLM's `vllm bench serve` modules (`vllm.benchmarks`); see loadtests/README.md.

Importing this package is cheap: vLLM is imported only by the run modules (`loadtests.runner`,
`loadtests.workload`, and `loadtests.report.build_run`), never by `loadtests.compare`.
"""

# The default generated image size mix (WxH:weight); here so `--help` needs no vLLM import.
DEFAULT_IMAGE_SIZES = "336x336:0.2,672x672:0.3,1024x768:0.3,768x1024:0.2"

from loadtests.report import SCHEMA, runs_of, validate_report  # noqa: E402

__all__ = ["DEFAULT_IMAGE_SIZES", "SCHEMA", "runs_of", "validate_report"]
