"""`from featmap.client import FeatureClient` stays light: what it loads, in a fresh interpreter.

Not a benchmark: the rule is which modules load, never how long they take. The spec's models
(pydantic) load when a spec is parsed, the runtime never.
"""

from __future__ import annotations

import ast
import subprocess
import sys

# asyncio is not among them: grpc's Cython core imports it (for grpc.aio) whoever imports grpc,
# so the blocking client cannot leave it out; it adds no import of its own.
LAZY = ("pydantic", "pydantic_core", "featmap.contract.spec", "featmap.contract.ops",
        "importlib.metadata")  # fmt: skip
NEVER = ("onnx", "onnxruntime", "featmap.service", "prometheus_client", "yaml", "PIL")


def loaded_after(statements: str) -> set[str]:
    """The modules of LAZY and NEVER (and their submodules) loaded after `statements`."""
    watched = LAZY + NEVER
    probe = (
        f"import sys\n{statements}\n"
        f"watched = {watched!r}\n"
        "print(sorted(m for m in sys.modules if m in watched or m.startswith("
        "tuple(w + '.' for w in watched))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return set(ast.literal_eval(result.stdout.strip().splitlines()[-1]))


def test_importing_the_client_loads_neither_pydantic_nor_the_spec() -> None:
    assert loaded_after("from featmap.client import FeatureClient, AsyncFeatureClient") == set()


def test_building_requests_without_parsing_a_spec_loads_no_pydantic() -> None:
    # An id or JSON text goes out as it is: nothing to validate here.
    statements = (
        "import numpy as np\n"
        "from featmap.client.messages import request_for\n"
        "request_for(np.zeros((1, 3, 8, 8), np.float32), 'a' * 32, 'float32')\n"
        "request_for(None, '{\"layers\": []}', 'float32')"
    )
    assert loaded_after(statements) == set()


def test_parsing_a_spec_loads_the_spec_models_then() -> None:
    statements = (
        "from featmap.client.messages import local_spec\n"
        "local_spec({'input': {'channels': 3}, 'layers': [{'op': 'relu'}]})"
    )
    loaded = loaded_after(statements)
    assert {"pydantic", "featmap.contract.spec"} <= loaded
    assert not {m for m in loaded if m.split(".")[0] in NEVER or m.startswith(NEVER)}
