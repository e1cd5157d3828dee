"""GGUF output: gguf-py's ``GGUFWriter`` with the two things ggq needs around it.

All GGUF files ggq writes go through gguf-py's writer: the converter uses ``gguf.GGUFWriter``
itself, ``ggq quantize`` and the imatrix writer this subclass, so the header, metadata and tensor
table are always gguf-py's bytes. On top of it:

* :meth:`GGUFWriter.copy_metadata` re-adds the keys of a file read by
  :func:`ggq.format.gguf_reader.read_gguf` with their original value and element types (as
  llama-quantize copies them), including empty arrays (valid GGUF that gguf-py refuses to write);
* :meth:`GGUFWriter.write_tensor_stream` writes one tensor's data from several parts (row slabs),
  padded to the alignment exactly as ``GGUFWriter.write_tensor_data`` pads one whole array, so a
  tensor larger than memory can be streamed.

Write into :func:`ggq.format.output.atomic_output`'s temporary path, so a failure leaves nothing.
"""

from __future__ import annotations

from typing import Iterable

import gguf
import numpy as np
from gguf import GGUFValueType

from ggq.errors import GGQError


class GGUFWriter(gguf.GGUFWriter):
    """``gguf.GGUFWriter`` (same constructor; ``arch=""`` writes no ``general.architecture``)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)

    def copy_metadata(self, header, skip: Iterable[str] = ()) -> None:
        """Add every key of ``header`` (:class:`~ggq.format.gguf_reader.GGUFHeader`) but those in
        ``skip``, in file order, with its value type and array element type."""
        skip = set(skip)
        for key, val in header.metadata.items():
            if key in skip:
                continue
            vt, sub = header.types[key]
            self.add_key_value(key, val, vt, sub_type=sub)

    def write_tensor_stream(self, parts: Iterable[np.ndarray], nbytes: int) -> int:
        """Write the next tensor's data (its info added with ``add_tensor_info``) from ``parts``
        (arrays written in order as their raw bytes), padding before and after to the alignment as
        ``write_tensor_data`` does. Returns the bytes written; GGQError (an internal error) if they
        are not ``nbytes``, the size the tensor table announced."""
        assert self.fout is not None and len(self.fout) == 1
        fout = self.fout[0]
        self.write_padding(fout, fout.tell())
        written = 0
        for a in parts:
            a = np.ascontiguousarray(a)
            a.tofile(fout)
            written += a.nbytes
        if written != nbytes:
            raise GGQError(f"internal error: a tensor encoded to {written} bytes, planned {nbytes}")
        self.write_padding(fout, written)
        self.state = gguf.gguf_writer.WriterState.WEIGHTS
        return written

    def close_files(self) -> None:
        """Close the output file(s) without flushing more (after a failure)."""
        for f in self.fout or ():
            try:
                f.close()
            except OSError:
                pass
        self.fout = None
