"""`import splice` stays cheap: it adds no heavy module beyond `import torch, transformers`
(transformers' model machinery, pandas and matplotlib load when a feature first needs them).
Checked by what gets imported, in a fresh interpreter, not by a timing."""

import json
import subprocess
import sys

HEAVY = ("transformers.modeling_utils", "transformers.integrations.sdpa_attention", "pandas", "matplotlib")


def _new_modules(statement: str) -> set[str]:
    code = (
        "import sys, json, torch, transformers; before = set(sys.modules); "
        f"{statement}; print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_splice_loads_no_heavy_module():
    new = _new_modules("import splice")
    assert "splice" in new
    assert not [m for m in new if m.split(".")[0] in ("pandas", "matplotlib") or m in HEAVY]


def test_the_attention_functions_load_transformers_machinery_only_when_needed():
    new = _new_modules("import splice, splice.engine.attention as a; a._register('sdpa')")
    assert "transformers.masking_utils" in new  # registering needs it: the check above can fail
