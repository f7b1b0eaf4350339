"""Layer shapes for the layer suites (forward, train, memory): named sets and `--shapes` parsing.

A case is (label, (out_features, in_features)); the label names the model ("" for none) and
goes into the row's case name.
"""

from __future__ import annotations

# (out, in) of Llama-3's projections: q/o, k/v, gate/up, down (config.json of the 8B and 70B models).
SHAPE_SETS = {
    "llama3-8b": [("Llama-3-8B", s) for s in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))],
    "llama3-70b": [("Llama-3-70B", s) for s in ((8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672))],
    # Small enough for a 2-core CPU: a square projection and Llama-2-7B's up projection.
    "cpu": [("", (4096, 4096)), ("", (11008, 4096))],
}
GPU_DEFAULT = SHAPE_SETS["llama3-8b"] + SHAPE_SETS["llama3-70b"]
GPU_QUICK = [("Llama-3-8B", (4096, 4096)), ("Llama-3-70B", (28672, 8192))]
CPU_DEFAULT, CPU_QUICK = SHAPE_SETS["cpu"], SHAPE_SETS["cpu"][:1]


def parse_shapes(text: str) -> list[tuple[str, tuple[int, int]]]:
    """'llama3-8b,4096x1024' -> the named set's cases followed by ('', (4096, 1024)).
    Each item is a set name or OUTxIN; '' gives []."""
    cases = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item.lower() in SHAPE_SETS:
            cases += SHAPE_SETS[item.lower()]
            continue
        try:
            out_f, in_f = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"a shape is OUTxIN (e.g. 4096x4096) or one of the sets {sorted(SHAPE_SETS)}; "
                             f"got {item!r}") from None
        if out_f < 1 or in_f < 1:
            raise ValueError(f"a shape's sizes must be positive; got {item!r}")
        cases.append(("", (out_f, in_f)))
    return cases


def as_cases(shapes) -> list[tuple[str, tuple[int, int]]]:
    """Accept labelled cases or bare (out, in) pairs (what tests pass)."""
    return [s if isinstance(s[0], str) else ("", tuple(s)) for s in shapes]


def layer_cases(on_gpu: bool, quick: bool, shapes=None) -> list[tuple[str, tuple[int, int]]]:
    """The cases a layer suite runs: --shapes if given, else the device's default (or quick) set."""
    if shapes:
        return as_cases(shapes)
    if on_gpu:
        return GPU_QUICK if quick else GPU_DEFAULT
    return CPU_QUICK if quick else CPU_DEFAULT


def case_name(suite: str, label: str, shape: str, M: int) -> str:
    """A layer suite's case name: 'forward Llama-3-8B 4096x4096 M=1', or without a label
    'train 1024x1024 M=64'."""
    return f"{suite} {(label + ' ') if label else ''}{shape} M={M}"
