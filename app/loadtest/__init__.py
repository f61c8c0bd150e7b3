"""Load testing for ``tokengate bench``: the driver (client), shapes and prompts (shapes), numbers and files (report,
charts).  Works against any OpenAI-compatible server; imports nothing from the gateway's request path."""

from .client import Driver, Endpoint, Progress, RequestResult, RunResult
from .report import parse_goodput, summarize_shape, write_reports
from .shapes import PromptSet, Shape, build_prompts, shape_grid

__all__ = ["Driver", "Endpoint", "Progress", "PromptSet", "RequestResult", "RunResult", "Shape", "build_prompts",
           "parse_goodput", "shape_grid", "summarize_shape", "write_reports"]
