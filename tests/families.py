"""The families the shared family tests (`test_families.py`) run, with the cases that switch
each distinctive feature on. A family joins by adding its tiny config to `hf.TINY` /
`hf.CONFIGS` and its cases here.

Each case: `(family, transformers config overrides)`. The first case of a family is its
richest; generation, export and scan checks run on it.
"""

CASES: dict[str, tuple[str, dict]] = {
}
