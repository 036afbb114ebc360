"""What the remote clients share: argument checks, splitting large calls into chunks, answer
checks, counters, the model's metadata (fetched once, parsed by :func:`metadata_dict`), the
input names taken from it and the choice of outputs.

The base of :class:`~deepzero_oracle.blackbox.grpc.GrpcBlackBox` (gRPC) and
:class:`~deepzero_oracle.blackbox.rest.RestBlackBox` (REST); each only sends chunks and fetches
metadata over its own protocol.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from deepzero_oracle.blackbox.errors import BlackBoxError, BlackBoxInvalidArgument, BlackBoxResourceExhausted
from deepzero_oracle.wire.codec import datatype_of, to_numpy
from deepzero_oracle.wire.constants import check_message_mb
from deepzero_oracle.wire.errors import WireError

# Room for the protobuf/JSON envelope around the tensor bytes of one message.
ENVELOPE_BYTES = 64 * 1024


class RemoteBlackBox:
    """Base of the remote black boxes: ``box(*inputs [N, ...]) -> [N, ...]`` like LocalBlackBox.

    A call is split into chunks of at most ``max_batch_rows`` rows that also fit the message
    limit; subclasses send the chunks (``_infer_chunks``). Answers are checked: every output
    must have one row per input row, or the call fails (never a silently wrong answer).

    Args (shared by every remote client):
        model: model name on the server ("" = the server's only model, where it allows that).
        version: model version ("" = the server's choice).
        input_names: names of the inputs in call order (default: from the model's metadata).
        output_names: outputs to return, in order (default: all, in the server's order).
        max_batch_rows: most rows per message; larger calls are split.
        max_message_mb: message size limit (MiB), which also bounds the rows per message.
    """

    target: str = ""

    def __init__(self, *, model: str = "", version: str = "", input_names: list[str] | None = None,
                 output_names: list[str] | None = None, max_batch_rows: int = 65536,
                 max_message_mb: float = 64):
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        self.model, self.version = model, version
        self.max_batch_rows = int(max_batch_rows)
        self.max_message_bytes = int(check_message_mb(max_message_mb, "max_message_mb") * 2**20)
        self.input_names = list(input_names) if input_names is not None else None
        self.output_names = list(output_names) if output_names is not None else None
        self._metadata: dict | None = None
        self.calls = 0
        self.rows = 0

    # -- subclass hooks --------------------------------------------------------------------
    def _infer_chunks(self, chunks: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Answer each chunk (a list of input arrays ``[n_i, ...]``) with its output arrays."""
        raise NotImplementedError

    def _fetch_metadata(self) -> dict:
        """Ask the server for the model's KServe v2 metadata (see :meth:`metadata`)."""
        raise NotImplementedError

    # -- metadata --------------------------------------------------------------------------
    def metadata(self) -> dict:
        """The model's KServe v2 metadata, fetched once: ``{"name", "versions", "platform",
        "inputs": [{"name", "datatype", "shape"}], "outputs": [...]}`` (-1: any size)."""
        if self._metadata is None:
            self._metadata = self._fetch_metadata()
        return self._metadata

    def _names(self, count: int) -> list[str]:
        """Wire names of ``count`` inputs, matched by position: ``input_names`` if given, else
        the names the model's metadata declares (when it declares ``count`` inputs), else
        ``input_0``, ``input_1``, ... (our server then matches by position)."""
        if self.input_names is not None:
            if len(self.input_names) != count:
                raise BlackBoxError(f"black box at {self.target}: called with {count} inputs but "
                                    f"input_names has {len(self.input_names)}: {self.input_names}")
            return self.input_names
        declared = [t["name"] for t in self.metadata().get("inputs", [])]
        return declared if len(declared) == count else [f"input_{i}" for i in range(count)]

    def _select(self, outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The answer's outputs ``{name: array [n, ...]}`` in the order to return: those of
        ``output_names`` if given (all must be there), else all, in the server's order."""
        if self.output_names is None:
            return list(outputs.values())
        missing = [n for n in self.output_names if n not in outputs]
        if missing:
            raise BlackBoxError(f"black box at {self.target} did not return output(s) {missing}; "
                                f"it returned {list(outputs)}")
        return [outputs[n] for n in self.output_names]

    # -- shared ----------------------------------------------------------------------------
    def _arrays(self, inputs) -> list[np.ndarray]:
        """Inputs (tensors / arrays / lists) -> C-contiguous arrays with one common row count."""
        if not inputs:
            raise BlackBoxInvalidArgument(f"black box at {self.target}: called with no inputs",
                                          target=self.target)
        try:
            arrays = [to_numpy(x, what=f"input {i}") for i, x in enumerate(inputs)]
            for a in arrays:
                datatype_of(a)
        except WireError as e:
            raise BlackBoxInvalidArgument(f"black box at {self.target}: {e}", target=self.target) from e
        for i, a in enumerate(arrays):
            if a.ndim == 0:
                raise BlackBoxInvalidArgument(
                    f"black box at {self.target}: input {i} is a scalar; send [N, ...] arrays",
                    target=self.target)
            if a.shape[0] != arrays[0].shape[0]:
                raise BlackBoxInvalidArgument(
                    f"black box at {self.target}: input {i} has {a.shape[0]} rows, input 0 has "
                    f"{arrays[0].shape[0]}; all inputs need the same batch size", target=self.target)
        return arrays

    def _rows_per_chunk(self, arrays: list[np.ndarray]) -> int:
        n = arrays[0].shape[0]
        per_row = sum(a.nbytes // max(n, 1) for a in arrays)
        budget = self.max_message_bytes - ENVELOPE_BYTES
        if per_row > budget:
            raise BlackBoxResourceExhausted(
                f"black box at {self.target}: one row takes {per_row / 2**20:.1f} MiB, over the "
                f"{self.max_message_bytes / 2**20:.0f} MiB message limit; raise max_message_mb= "
                "here and --max-message-mb on the server", target=self.target)
        return max(1, min(self.max_batch_rows, budget // max(per_row, 1)))

    def __call__(self, *inputs):
        """Query the black box: inputs ``[N, ...]`` -> a tensor ``[N, ...]`` (tuple if several)."""
        arrays = self._arrays(inputs)
        n = arrays[0].shape[0]
        step = self._rows_per_chunk(arrays)
        bounds = [(s, min(s + step, n)) for s in range(0, n, step)] or [(0, 0)]
        chunks = [[a[s:e] for a in arrays] for s, e in bounds]
        answers = self._infer_chunks(chunks)
        for (s, e), outs in zip(bounds, answers):
            check_rows(outs, e - s, self.target)
        if len({len(outs) for outs in answers}) > 1:
            raise BlackBoxError(f"black box at {self.target} answered chunks with different "
                                "numbers of outputs")
        if len(answers) == 1:
            outs = [o if o.flags.writeable else o.copy() for o in answers[0]]
        else:
            outs = [np.concatenate(parts) for parts in zip(*answers)]
        self.calls += 1
        self.rows += n
        return to_tensors(outs)


def metadata_dict(md) -> dict:
    """A model's KServe v2 metadata, from a ``ModelMetadataResponse`` (gRPC) or the parsed JSON
    of ``GET /v2/models/<name>`` (REST), as ``{"name", "versions", "platform", "inputs":
    [{"name", "datatype", "shape"}], "outputs": [...]}`` (-1: any size). A JSON answer keeps
    its other keys (e.g. ``parameters``).

    Raises:
        BlackBoxError: the JSON answer is not metadata (no list of named tensors).
    """
    def tensors(ts):
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

    if not isinstance(md, Mapping):
        if not hasattr(md, "inputs"):
            raise BlackBoxError(f"the model's metadata is not a JSON object: {str(md)[:200]}")
        return {"name": md.name, "versions": list(md.versions), "platform": md.platform,
                "inputs": tensors(md.inputs), "outputs": tensors(md.outputs)}
    out = dict(md)
    for key in ("inputs", "outputs"):
        listed = out.get(key, [])
        if not isinstance(listed, list) or not all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                                    for t in listed):
            raise BlackBoxError(f"the model's metadata has no valid {key!r} list of named tensors: "
                                f"{str(listed)[:200]}")
        out[key] = [{**t, "shape": list(t.get("shape") or [])} for t in listed]
    return out


def check_rows(outs: list[np.ndarray], rows: int, target: str) -> None:
    """Every output must have ``rows`` rows: a shorter answer must not pass as a gradient."""
    if not outs:
        raise BlackBoxError(f"black box at {target} answered with no outputs")
    for i, o in enumerate(outs):
        if o.ndim == 0 or o.shape[0] != rows:
            raise BlackBoxError(f"black box at {target} returned output {i} of shape "
                                f"{list(o.shape)} for {rows} input rows; it must return one row "
                                "per input row")


def to_tensors(outs: list[np.ndarray]):
    """Arrays -> one tensor, or a tuple of tensors for several outputs."""
    tensors = tuple(torch.from_numpy(o if o.flags.writeable else o.copy()) for o in outs)
    return tensors[0] if len(tensors) == 1 else tensors


__all__ = ["ENVELOPE_BYTES", "RemoteBlackBox", "check_rows", "metadata_dict", "to_tensors"]
