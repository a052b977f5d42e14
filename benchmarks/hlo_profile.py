"""The compiled HLO text of a jitted step, read for profiling: instructions, module scopes,
Python stacks, and the op category of each instruction.

Input: `compiled.as_text()` of a `jax.jit(...).lower(...).compile()` executable, lowered with
Flax's module scopes on (`flax.linen.override_named_call(True)`). The parts read:

  HloModule jit__step, is_scheduled=true, ...          <- module name (the trace's hlo_module)

  FileNames                                            <- numbered tables, one blank line apart
  1 "/repo/megalodon_flax/megalodon/cema.py"
  FunctionNames
  1 "CEMA.__call__"
  FileLocations
  1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
  StackFrames
  1 {file_location_id=1 parent_frame_id=1}             <- parent printed as id + 1 (1 = none)

  %fused_computation.3 (param_0: f32[4,8]) -> c64[4,5] {    <- a computation
    ROOT %fft.1 = c64[4,5]{1,0} fft(%param_0), fft_type=RFFT,
        metadata={op_name="jit(_step)/jvp(MegalodonLM)/model/layers_0/attn/cema/fft"
                  stack_frame_id=2}
  }
  ENTRY %main.9 (p: f32[4,8]) -> c64[4,5] {
    %fusion.1 = c64[4,5]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation.3
  }

`parse_hlo` turns it into an HloIndex; `HloIndex.info(name)` gives the OpInfo of one executed
instruction (the `hlo_op` of a profiler thunk event, see trace_profile), and `categorize`
names its category with the ordered rule table RULES (first match wins). Pure functions of
the text: nothing here runs JAX.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MODEL_SCOPE = "MegalodonLM"  # Flax's scope name of the unnamed top module (its class name)

# ---------------------------------------------------------------------------- categories
CEMA_KERNEL = "CEMA kernel construction"
FFT = "FFT"
CEMA_OTHER = "CEMA other"
TIMESTEP_NORM = "TimestepNorm"
ATTENTION = "attention"
MATMUL = "matmuls"
OTHER_NORMS = "other norms"
OPTIMIZER = "optimizer"
LOSS_EMBEDDING = "loss/embedding"
ELEMENTWISE = "other elementwise"
UNATTRIBUTED = "unattributed"
CATEGORIES = (
    CEMA_KERNEL,
    FFT,
    CEMA_OTHER,
    TIMESTEP_NORM,
    ATTENTION,
    MATMUL,
    OTHER_NORMS,
    OPTIMIZER,
    LOSS_EMBEDDING,
    ELEMENTWISE,
    UNATTRIBUTED,
)


@dataclass
class OpInfo:
    """What the categorizer knows about one executed HLO instruction (thunk).

    kind: effective opcode (`HloIndex.kind`); op_name: metadata module path, "<none>" when
    nothing is known; functions: qualified names on its Python stack; scopes: `scope_segments`
    of op_name; stack: innermost six frames as "function:line".
    """

    name: str
    kind: str
    op_name: str
    functions: frozenset[str]
    scopes: frozenset[str]
    stack: tuple[str, ...] = ()
    metadata_from: str = ""  # the neighbour whose metadata was borrowed ("" = its own)
    fused_dots: tuple[str, ...] = ()  # module paths of the dots inside a fusion


@dataclass(frozen=True)
class Rule:
    """One row of the category table; every given condition must hold.

    opcodes: the instruction's effective opcode is one of these.
    functions: a function on its Python stack starts with one of these prefixes (qualified
      names such as `CEMA.__call__` or `cema_kernel.<locals>.kernel_block`; prefixes keep
      the rules valid when helpers are added or renamed), or one of `scopes` is a segment of
      its module path (op_name); `scopes` is the fallback for metadata without stack frames.
    op_name_has: one of these substrings occurs in its op_name.
    outside_model: True = the op_name lies outside the model scope, False = inside.
    """

    category: str
    opcodes: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    op_name_has: tuple[str, ...] = ()
    outside_model: bool | None = None

    def matches(self, op: OpInfo) -> bool:
        if self.opcodes and op.kind not in self.opcodes:
            return False
        if (self.functions or self.scopes) and not (
            any(fn.startswith(self.functions) for fn in op.functions)
            or any(s in op.scopes for s in self.scopes)
        ):
            return False
        if self.op_name_has and not any(s in op.op_name for s in self.op_name_has):
            return False
        return self.outside_model is None or self.outside_model == (MODEL_SCOPE not in op.scopes)

    def describe(self) -> str:
        parts = []
        if self.opcodes:
            parts.append("opcode in " + "/".join(self.opcodes))
        if self.functions or self.scopes:
            names = [f"{f}*" for f in self.functions] + [f"scope {s}" for s in self.scopes]
            parts.append("stack has " + " | ".join(names))
        if self.op_name_has:
            parts.append("op_name has " + " | ".join(self.op_name_has))
        if self.outside_model is not None:
            parts.append(("outside" if self.outside_model else "inside") + " the model scope")
        return "; ".join(parts) or "anything"


# Ordered: the first matching rule names the category.
RULES: tuple[Rule, ...] = (
    Rule(UNATTRIBUTED, op_name_has=("<none>",)),
    Rule(FFT, opcodes=("fft",)),
    Rule(FFT, functions=("causal_convolution",)),  # padding, spectra product, slicing
    Rule(
        CEMA_KERNEL,  # coefficients, powers q^j (polar form), kernel / bias assembly
        functions=(
            "cema_coefficients",
            "cema_kernel",
            "initial_state_bias",
            "_power",
            "_expand_lags",
        ),
    ),
    Rule(CEMA_OTHER, functions=("CEMA.__call__", "cema"), scopes=("cema",)),
    Rule(
        TIMESTEP_NORM,
        functions=(
            "TimestepNorm.",
            "timestep_norm_statistics",
            "_anchored_statistics",
            "chan_merge",
            "segmented_merge",
            "packed_statistics",
        ),
        scopes=("timenorm",),
    ),
    Rule(OTHER_NORMS, functions=("RMSNorm.", "LayerNorm.")),
    Rule(
        ATTENTION,
        functions=(
            "chunked_attention",
            "masked_attention",
            "streaming_attention",
            "_decode_attention",
            "apply_rope",
            "rope_frequencies",
            "rms_normalize",  # the per-head Q/K normalization (RMSNorm is matched above)
        ),
    ),
    Rule(MATMUL, opcodes=("dot", "convolution")),
    Rule(
        LOSS_EMBEDDING,
        functions=("next_token_loss", "softmax_cross_entropy", "Embed."),
        scopes=("embed",),
    ),
    Rule(OPTIMIZER, outside_model=True),
    Rule(ELEMENTWISE),
)


def categorize(op: OpInfo) -> str:
    """The category of the first rule of RULES that matches op (the last rule matches
    every op)."""
    return next(rule.category for rule in RULES if rule.matches(op))


def rules_table() -> list[dict[str, str]]:
    """RULES in order as [{"category": ..., "when": Rule.describe()}] (for the JSON)."""
    return [{"category": r.category, "when": r.describe()} for r in RULES]


# ---------------------------------------------------------------------------- module paths
_DROPPED = re.compile(r"^(jit|pjit)\(.*\)$|^(checkpoint|remat|rematted_computation)$")
_WRAPPED = re.compile(r"^(?:jvp|transpose|vmap|remat|checkpoint)\((.*)\)$")


def scope_segments(op_name: str) -> list[str]:
    """Module-path segments of an op_name: `jit(f)` segments (jitted functions, not modules)
    and remat markers dropped, `jvp(...)` / `transpose(...)` / `vmap(...)` wrappers unwrapped.

    `jit(_step)/transpose(jvp(MegalodonLM))/model/layers_0/attn/cema/jit(fft)/fft` →
    [MegalodonLM, model, layers_0, attn, cema, fft]; the last segment is the primitive.
    """
    out = []
    for seg in op_name.split("/"):
        if _DROPPED.match(seg):
            continue
        while True:  # transpose(jvp(X)) → X
            m = _WRAPPED.match(seg)
            if not m:
                break
            seg = m.group(1)
        if seg:
            out.append(seg)
    return out


def short_scope(op_name: str) -> str:
    """The innermost module path of an op_name, e.g. `layers_5/attn/wh1` ("?" if none)."""
    segs = [s for s in scope_segments(op_name)[:-1] if s not in (MODEL_SCOPE, "model")]
    return "/".join(segs[-3:]) or "?"


# ---------------------------------------------------------------------------- HLO text
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_CALLS = re.compile(r"calls=(\{[^}]*\}|%[^\s,)]+)")
_KV = re.compile(r"(\w+)=(\d+)")
_OPERAND = re.compile(r"%([^\s,()]+)")
# Effective opcode of a fusion: the first of these found inside it, else "elementwise".
_KIND_ORDER = ("fft", "convolution", "dot", "scatter", "gather", "sort", "reduce")


@dataclass
class Instruction:
    """One HLO instruction of the compiled text.

    op_name / frame_id: its metadata ("" / 0 when it has none); calls: the computations it
    calls (fusion bodies ...); operands: names of its operand instructions.
    """

    name: str
    opcode: str
    op_name: str = ""
    frame_id: int = 0
    calls: tuple[str, ...] = ()
    operands: tuple[str, ...] = ()
    is_root: bool = False


@dataclass
class HloIndex:
    """Instructions of a compiled module with their metadata and Python stacks.

    instructions: by name (without `%`), over all computations; computations: name → its
    instructions in text order; functions / files: FunctionNames / FileNames by id;
    locations: FileLocations id → (file id, function id, line); frames: StackFrames id →
    (location id, printed parent id); users: instruction name → names of its users.
    """

    module: str
    instructions: dict[str, Instruction] = field(default_factory=dict)
    computations: dict[str, list[Instruction]] = field(default_factory=dict)
    functions: dict[int, str] = field(default_factory=dict)
    files: dict[int, str] = field(default_factory=dict)
    locations: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # file, fn, line
    frames: dict[int, tuple[int, int]] = field(default_factory=dict)  # location, parent
    users: dict[str, list[str]] = field(default_factory=dict)

    def stack(self, frame_id: int) -> list[tuple[str, str, int]]:
        """(function, file, line) from the innermost frame outwards."""
        out: list[tuple[str, str, int]] = []
        seen: set[int] = set()
        while frame_id > 0 and frame_id in self.frames and frame_id not in seen:
            seen.add(frame_id)
            loc, printed_parent = self.frames[frame_id]
            file_id, fn_id, line = self.locations.get(loc, (0, 0, 0))
            out.append((self.functions.get(fn_id, "?"), self.files.get(file_id, "?"), line))
            frame_id = printed_parent - 1
        return out

    def kind(self, instr: Instruction) -> str:
        """Effective opcode: a fusion's most expensive kind of content, else the opcode."""
        if instr.opcode != "fusion":
            return instr.opcode
        found = {i.opcode for i in self._fused(instr)}
        for kind in _KIND_ORDER:
            if kind in found:
                return kind
        return "elementwise"

    def _fused(self, instr: Instruction) -> list[Instruction]:
        """The instructions of every computation instr calls, transitively."""
        out: list[Instruction] = []
        todo = list(instr.calls)
        seen: set[str] = set()
        while todo:
            comp = todo.pop()
            if comp in seen:
                continue
            seen.add(comp)
            for inner in self.computations.get(comp, []):
                out.append(inner)
                todo.extend(inner.calls)
        return out

    def primary(self, instr: Instruction) -> Instruction:
        """The instruction whose metadata describes a thunk: for fusions holding an fft /
        dot / convolution that instruction, else the fusion itself (XLA gives it the root's
        metadata), else the fused root."""
        if instr.opcode != "fusion":
            return instr
        fused = self._fused(instr)
        for kind in ("fft", "convolution", "dot"):
            for inner in fused:
                if inner.opcode == kind and inner.op_name:
                    return inner
        if instr.op_name:
            return instr
        for inner in fused:
            if inner.is_root and inner.op_name:
                return inner
        return next((i for i in fused if i.op_name), instr)

    def borrowed(self, instr: Instruction, depth: int = 3) -> tuple[str, Instruction] | None:
        """For an instruction without metadata (XLA rewrites drop it, e.g. some dots): the
        nearest operand, else user, with metadata (breadth first, up to `depth` hops);
        parameters and constants do not lend theirs. Returns (neighbour name, the
        instruction whose metadata it lends)."""
        links: tuple[Callable[[Instruction], Iterable[str]], ...] = (
            lambda i: i.operands,
            lambda i: self.users.get(i.name, ()),
        )
        for neighbours in links:
            frontier, seen = [instr.name], {instr.name}
            for _ in range(depth):
                nxt = []
                for name in frontier:
                    for other in neighbours(self.instructions[name]):
                        if other in seen or other not in self.instructions:
                            continue
                        seen.add(other)
                        cand = self.instructions[other]
                        if cand.opcode in ("parameter", "constant"):
                            continue
                        source = self.primary(cand)
                        if source.op_name:
                            return other, source
                        nxt.append(other)
                frontier = nxt
        return None

    def info(self, name: str) -> OpInfo:
        """The categorizer's view of the instruction `name` (<none> when nothing is known)."""
        instr = self.instructions.get(name)
        if instr is None:
            return OpInfo(
                name=name, kind="?", op_name="<none>", functions=frozenset(), scopes=frozenset()
            )
        source = self.primary(instr)
        lender = ""
        if not source.op_name:
            donor = self.borrowed(instr)
            if donor is not None:
                lender, source = donor
        op_name = source.op_name or "<none>"
        stack = self.stack(source.frame_id)
        return OpInfo(
            name=name,
            kind=self.kind(instr),
            op_name=op_name,
            functions=frozenset(fn for fn, _, _ in stack),
            scopes=frozenset(scope_segments(op_name)),
            stack=tuple(f"{fn}:{line}" for fn, _, line in stack[:6]),
            metadata_from=lender,
            fused_dots=tuple(
                short_scope(i.op_name)
                for i in self._fused(instr)
                if i.opcode in ("dot", "convolution")
            ),
        )


def _numbered(text: str, header: str) -> dict[int, str]:
    """The rows of a numbered table (FileNames, ...) of the HLO text as {number: rest of the
    row}; {} when the table is absent. A table ends at a blank line or the next header."""
    match = re.search(rf"^{header}\n(.*?)(?:\n\n|\n[A-Z][A-Za-z]+\n)", text, re.S | re.M)
    rows: dict[int, str] = {}
    for line in match.group(1).splitlines() if match else []:
        num, _, rest = line.strip().partition(" ")
        rows[int(num)] = rest
    return rows


def _operands(rest: str) -> tuple[str, ...]:
    """Operand names of an instruction from the text after `opcode(`, up to its `)`."""
    depth, end = 0, len(rest)
    for pos, ch in enumerate(rest):
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                end = pos
                break
            depth -= 1
    return tuple(_OPERAND.findall(rest[:end]))


def parse_hlo(text: str) -> HloIndex:
    """Parses `compiled.as_text()` (format in the module docstring): instructions, metadata,
    called computations, operands / users and the stack tables."""
    first = text.split("\n", 1)[0]
    module = first.split()[1].rstrip(",") if first.startswith("HloModule") else "?"
    index = HloIndex(module=module)
    index.files = {n: rest.strip('"') for n, rest in _numbered(text, "FileNames").items()}
    index.functions = {n: rest.strip('"') for n, rest in _numbered(text, "FunctionNames").items()}
    for num, rest in _numbered(text, "FileLocations").items():
        kv = {k: int(v) for k, v in _KV.findall(rest)}
        index.locations[num] = (
            kv.get("file_name_id", 0),
            kv.get("function_name_id", 0),
            kv.get("line", 0),
        )
    for num, rest in _numbered(text, "StackFrames").items():
        kv = {k: int(v) for k, v in _KV.findall(rest)}
        index.frames[num] = (kv.get("file_location_id", 0), kv.get("parent_frame_id", 0))
    computation = ""
    for line in text.splitlines():
        comp = _COMP.match(line)
        if comp:
            computation = comp.group(1)
            index.computations.setdefault(computation, [])
            continue
        m = _INSTR.match(line)
        if not m or not computation:
            continue
        name, _, opcode, rest = m.groups()
        op_name = _OP_NAME.search(rest)
        frame = _FRAME_ID.search(rest)
        calls = _CALLS.search(rest)
        called: tuple[str, ...] = ()
        if calls:
            called = tuple(c.strip().lstrip("%") for c in calls.group(1).strip("{}").split(","))
        operands = _operands(rest)
        for operand in operands:
            index.users.setdefault(operand, []).append(name)
        instr = Instruction(
            name=name,
            opcode=opcode,
            op_name=op_name.group(1).replace("\\'", "'") if op_name else "",
            frame_id=int(frame.group(1)) if frame else 0,
            calls=tuple(c for c in called if c),
            operands=operands,
            is_root=line.lstrip().startswith("ROOT "),
        )
        index.instructions[name] = instr
        index.computations[computation].append(instr)
    return index
