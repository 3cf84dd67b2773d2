"""Inference backends behind one interface.

A backend is a callable taking a float32 (N,3,h,w) RGB batch in [0,1] on the engine's device and
returning (restored float32 (N,3,h,w), [gamma1, gamma2, gamma3] float32), like QAIRN.forward.
`fixed_tile` is True for backends that want every tile at the planned full size (static engines).
`max_hw` (H, W), where set, is the largest input a backend runs (a dynamic engine's profile).
Backends that can pool quality inside the model also offer `forward_pooled(x, p, cores, maps, image)`.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import numbers

import numpy as np
import torch

from qairn.kernels.gate import POOL_SCALE_LOG2
from qairn.model import QAIRN

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# name -> "module:factory" for backends that live with their own subsystem (loaded lazily).
EXTERNAL = {
    "onnxruntime": "qairn.export.ort_backend:make_backend",
    "tensorrt": "qairn.export.trt_backend:make_backend",
}
BACKENDS = ("eager", "compile", "triton", *EXTERNAL)
EXTERNAL_CLASSES = {"onnxruntime": "OrtBackend", "tensorrt": "TrtBackend"}  # in EXTERNAL's modules


def check_options(name: str, cls: type, options: dict, set_here: tuple = ()) -> None:
    """A misspelt Restorer option (tile_size=256) reached the backend as "TorchBackend.__init__() got an
    unexpected keyword argument": say which option, and what this backend takes, in the user's terms."""
    given = ("self", "model", "device", "precision", *set_here)  # by the Restorer and make_backend
    own = [k for k in inspect.signature(cls.__init__).parameters if k not in given]
    unknown = sorted(set(options) - set(own))
    if unknown:
        raise TypeError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: neither a Restorer "
            f"argument nor one of backend {name!r}'s ({', '.join(own) or 'none'})"
            + "".join(f"; for {k}, give backend={k!r}" for k in unknown if k in BACKENDS)
        )


def check_switch(name: str, value) -> bool:
    """An on/off option as a bool. Taken by its truth, "no" turned it on."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, not {value!r}")
    return bool(value)


class BackendError(RuntimeError):
    """A backend that cannot be made or cannot run here (unknown name or precision, a missing package, no
    such device, an engine or ONNX file that does not fit); the message says which and why."""


class UnknownOptionError(BackendError, ValueError):
    """An unknown backend or precision name: a bad argument (a ValueError, as the Restorer's other
    argument checks raise) as well as a BackendError, which callers caught before it was both."""


class DeviceError(BackendError, ValueError):
    """A device that is not a device name, or not on this machine (cuda:3 with one GPU): a BackendError,
    as the README's "what a caller catches" says, and a ValueError, as it was before it was both."""


class Closing:
    """`with backend:` for backends whose close() frees an engine's memory at once."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TorchBackend:
    """Eager PyTorch, optionally torch.compile'd, optionally with the Triton-fused gate (triton=True)
    and the Triton-fused thin convs (fused_conv=True, or the widest conv to fuse)."""

    fixed_tile = False

    def __init__(
        self,
        model: QAIRN,
        device: torch.device,
        precision: str = "fp32",
        compile: bool = False,
        triton: bool = False,
        channels_last: bool | None = None,
        fused_conv: bool | int = False,
        cudagraphs: bool = True,
    ):
        # "yes" failed inside int(), 2.5 became 2 and -1 fused nothing, unsaid. 0 is False.
        if not (isinstance(fused_conv, numbers.Integral) and fused_conv >= 0):  # True is 1
            raise ValueError(
                f"fused_conv takes True, False or the widest conv to fuse (an int >= 1), not {fused_conv!r}"
            )
        triton = check_switch("triton", triton)
        channels_last = None if channels_last is None else check_switch("channels_last", channels_last)
        self.dtype = PRECISIONS[precision]
        self.device = device
        # channels_last by default everywhere: cuDNN's tensor-core convs want it, and on this 2-core CPU
        # `qairn restore` of a LIVE1 image went from 4.3 s to 2.7 s with it (2026-11-27, busy machine;
        # outputs within 1/255).
        self.channels_last = True if channels_last is None else channels_last
        # A copy: .to() and the kernel swaps below change a module in place, and the caller's model
        # (or another Restorer sharing it) must not turn bf16 or channels_last under them.
        model = copy.deepcopy(model).to(device=device, dtype=self.dtype).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if triton:
            from qairn.kernels import gate

            # The op's Triton kernel is CUDA's (CPU tensors run its reference): on the CPU, where it never
            # launches, triton is not imported (0.4 s, and a broken install would refuse a CPU run).
            gate.use_gate_backend(model, "triton", load=device.type == "cuda")
        if fused_conv:
            # Convs at most 64 wide (or fused_conv, when an int) with their ReLU and residual add
            # in one Triton kernel each (CUDA; the reference conv elsewhere): kernels/fuse.py.
            from qairn.kernels import fuse

            width = fuse.DEFAULT_MAX_CHANNELS if fused_conv is True else int(fused_conv)
            fuse.use_conv_backend(model, "triton", max_channels=width)
        self.model = model
        self.net = model
        self.graphs = compile and cudagraphs and device.type == "cuda"
        if compile:
            # Static tile shapes: CUDA graphs ("reduce-overhead") replay the whole forward per batch,
            # unless cudagraphs=False (the Restorer's cuda_graph captures whole frames instead).
            self.net = torch.compile(model, mode="reduce-overhead" if self.graphs else None, dynamic=False)
            self.fixed_tile = True

    def close(self) -> None:
        """Let go of the network's device copy now (Restorer.close), not when the Restorer is collected."""
        self.model = self.net = None

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        """float32 output the caller may keep: CUDA-graph outputs are overwritten by the next replay,
        so those are cloned when .float() did not already copy; eager outputs are fresh anyway."""
        f = t.float()
        return f.clone() if self.graphs and f.data_ptr() == t.data_ptr() else f

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.net is None:  # said here, before self.net(...) is called
            raise BackendError("this torch backend was closed")
        # One copy for both the cast and the layout (a tile crop is a strided view anyway).
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(dtype=self.dtype, memory_format=layout)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor):
        y, gammas = self.net(self._prepare(x))
        return self._own(y), [self._own(g) for g in gammas]

    @torch.inference_mode()
    def forward_pooled(
        self, x: torch.Tensor, p: float, cores: torch.Tensor, maps: bool = True, image: bool = True
    ):
        """Like __call__, plus (3, N) float64 sums of gamma**p over each image's core box (input
        pixels), taken inside the gate: with the Triton gate, in the same pass as the blend.
        maps=False returns None for the gammas: quality alone needs no float copy of them.
        image=False returns None for the restored batch, whose tail is then not run."""
        y, gammas, pooled = self.net(self._prepare(x), pool_p=p, cores=cores, image=image)
        # Unscaled in float64 (exact: a power of 2), where no gamma**p underflows.
        sums = torch.stack([s for s, _ in pooled]).double() * 2.0**-POOL_SCALE_LOG2
        y = self._own(y) if image else None
        return y, [self._own(g) for g in gammas] if maps else None, sums


def make_backend(name: str, model: QAIRN, device: torch.device, precision: str = "fp32", **options):
    if precision not in PRECISIONS:
        raise UnknownOptionError(
            f"unknown precision {precision!r}; choose one of {', '.join(sorted(PRECISIONS))}"
        )
    if name in ("eager", "compile", "triton"):
        # compile=True and triton=True are set below, by the backends of those names: eager with
        # compile=True ran a compiled network under the name "eager" (and the Restorer's cuda_graph
        # turns torch.compile's own graphs off for backend="compile" only). compile takes triton=True.
        set_here = {"eager": ("compile", "triton"), "compile": ("compile",), "triton": ("triton", "compile")}
        check_options(name, TorchBackend, options, set_here[name])
    if name == "eager":
        return TorchBackend(model, device, precision, **options)
    if name == "compile":
        return TorchBackend(model, device, precision, compile=True, **options)
    if name == "triton":
        return TorchBackend(model, device, precision, triton=True, **options)
    if name in EXTERNAL:
        if options.get("fused_conv"):
            raise BackendError(f"fused_conv runs on the torch backends (eager, compile, triton), not {name}")
        module, func = EXTERNAL[name].split(":")
        try:
            module = importlib.import_module(module)
            factory, cls = getattr(module, func), getattr(module, EXTERNAL_CLASSES[name])
        except (ImportError, AttributeError) as e:
            raise BackendError(f"backend {name!r} is not available: {e}") from None
        check_options(name, cls, options)
        return factory(model, device, precision, **options)
    raise UnknownOptionError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
