"""The pass protocol and the pass manager, in the shape of onnx_ir's pass infrastructure.

A pass is an object with a `name`, the `options` it reads (fields of CompileOptions or
Hardware: mapping.bin records their values from this declaration), `requires` / `ensures`
checks, and `call(program, context) -> PassResult`. Calling the pass runs the three in order.
A pass never mutates its input program (the IR is immutable); it returns a new one and says
whether anything changed. Adding a pass is one file here and one line in xcompile/pipeline.py.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from tqdm.auto import tqdm

from xcompile.errors import XCompileError
from xcompile.ir import PassRecord, Program


class PassError(XCompileError):
    """A pass cannot run on this program, or broke its own promise."""


class PreconditionError(PassError):
    """The program is not in the state the pass needs (e.g. tiling before encoding)."""


class PostconditionError(PassError):
    """A pass's result fails the pass's own guarantee: a bug, not bad input."""


@dataclass(frozen=True)
class PassResult:
    """A pass's answer: the new program and whether anything changed."""

    program: Program
    changed: bool


@dataclass(frozen=True)
class PassContext:
    """What a pass may use besides the program.

    calibration: the data data-driven passes measure the model on (xcompile.probe.Calibration).
    simulator: builds a compile-time simulator of a program on given hardware (runtime/simulator.py):
    passes that measure the network on hardware get it here, never by building a runtime session.
    lower: the passes after the current one that put layers into cells (encode, tile, assign),
    for a pass that must see its candidate layers as cells.
    progress: called once per layer a pass finishes.
    """

    calibration: Any = None
    simulator: Callable[..., Any] | None = None
    lower: Callable[[Program], Program] | None = None
    progress: Callable[[], Any] | None = None

    def step(self) -> None:
        if self.progress is not None:
            self.progress()


class Pass:
    """Base of every compiler pass: subclasses set `name` and `options` and write `call`."""

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()
    lowers: ClassVar[bool] = False  # part of `PassContext.lower`: puts layers into cells

    def requires(self, program: Program) -> None:
        """Raise PreconditionError when the program is not ready for this pass."""

    def ensures(self, program: Program) -> None:
        """Raise PostconditionError when the result breaks what this pass promises."""

    def call(self, program: Program, context: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, program: Program, context: PassContext | None = None) -> PassResult:
        context = PassContext() if context is None else context
        self.requires(program)
        result = self.call(program, context)
        if result.program is program and result.changed:
            raise PostconditionError(f"pass '{self.name}' says it changed the program but returned its input")
        self.ensures(result.program)
        return result

    def record(self, program: Program, context: PassContext) -> dict[str, Any]:
        """The values of the options this pass read, as mapping.bin records them."""
        return {name: _option(program, name) for name in self.options}

    def fail(self, message: str, error: type[PassError] = PreconditionError) -> None:
        raise error(f"pass '{self.name}': {message}")


def _option(program: Program, name: str) -> Any:
    for source in (program.options, program.hardware):
        if any(f.name == name for f in dataclasses.fields(source)):
            return getattr(source, name)
    raise PassError(f"option '{name}' is neither a compile option nor a hardware key")


class PassManager:
    """Runs passes in order, with a progress bar, and records each in the program's history."""

    def __init__(self, passes: tuple[Pass, ...]):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise PassError(f"pass names must be unique, got {names}")
        self.passes = passes

    def __call__(self, program: Program, *, calibration=None, simulator=None, progress: bool | None = None) -> Program:
        steps = len(self.passes) * max(1, len(program.layers))
        with tqdm(total=steps, desc="compiling", unit="step", disable=None if progress is None else not progress, leave=False) as bar:
            for position, compiler_pass in enumerate(self.passes):
                later = tuple(p for p in self.passes[position + 1 :] if p.lowers)
                context = PassContext(calibration=calibration, simulator=simulator, lower=_sequence(later), progress=bar.update)
                started = time.perf_counter()
                result = compiler_pass(program, context)
                record = PassRecord(
                    name=compiler_pass.name,
                    options=compiler_pass.record(result.program, context),
                    changed=result.changed,
                    seconds=round(time.perf_counter() - started, 6),
                )
                program = dataclasses.replace(result.program, history=program.history + (record,))
        return program


def _sequence(passes: tuple[Pass, ...]) -> Callable[[Program], Program]:
    def run(program: Program) -> Program:
        for compiler_pass in passes:
            program = compiler_pass(program).program
        return program

    return run
