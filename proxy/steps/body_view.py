"""One parsed view of an inference body, read the way Triton reads it: every body-level check decides on it.

Triton decodes JSON (escapes and all), undoes `Content-Encoding` on infer, splits binary tensors off
at `Inference-Header-Content-Length`, and converts numbers to the tensor's datatype. A check that
looked at the raw bytes instead (`b"shared_memory_region" in body`) was blind to
`"shared\\u005fmemory_region"`, to a gzip body, and to `max_tokens` wrapped past int32: two parsers
that disagree. So the body is parsed once, here, into a `BodyView`, and whatever this parser cannot
read exactly as Triton would is refused (`BadRequest`), never waved through unchecked:

- JSON that Triton's parser (rapidjson) and Python's could read differently: duplicate keys (Triton
  takes the first, Python the last), bytes that are not UTF-8, a byte-order mark, lone surrogates,
  NUL in a key (Triton's C strings end there), nesting deeper than Python's parser goes;
- NUL in a tensor's name or datatype, over HTTP and gRPC alike: Triton hands them on as C strings, so
  an input named "max_tokens\\u0000x" reaches the model as max_tokens while a check comparing the
  whole name would see some other input;
- a `Content-Encoding` Triton would not apply on that route (415), several of them, or compressed
  data followed by anything (Triton inflates one stream and ignores the rest);
- an `Inference-Header-Content-Length` that is not plain digits (Triton's `stoi` reads "12abc" as 12)
  or does not fit the body, and binary tensor sizes that do not add up to the bytes sent;
- a `max_tokens` that is not an integer in its datatype's range (Triton wraps 2**32 + 200 to 200), or
  a negative one on generate (no datatype named: Triton casts it to the model's, INT16 wraps -65336 to 200).

Probed against tritonserver 2.51 (tests/steps/test_body_view_triton.py keeps the two in step).
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from tritonclient.grpc import service_pb2

from ..errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

MAX_TOKENS = "max_tokens"
# The inputs the model tokenizes: their bytes bound the prompt's tokens (BodyView.prompt_bound).
PROMPT_INPUTS = frozenset({"text_input", "messages"})
COUNT_OUTPUTS = ("input_tokens", "output_tokens")
# Tokens per prompt beyond one per byte. The checkpoints are byte-level BPE (DeepSeek-V3's, and
# proxy/local/tinymodel.py's): every ordinary token covers at least one byte of the text, so a text
# of n bytes is at most n tokens plus the special tokens the tokenizer adds (BOS). A `messages` chat
# is rendered by DeepSeek's chat template: per message a role marker (`<|User|>`, 8 bytes;
# `<|Assistant|>` + EOS, 13 + 1) that is shorter than the message's JSON keys it stands in for
# (`{"role":"user","content":""}`, 29 bytes, counted already), with JSON escapes never shorter than
# the content's UTF-8; the slack covers BOS and the generation prompt (`<|Assistant|>`) and more.
PROMPT_SLACK = 64
DECODE_STEP = 64 * 1024   # bytes of output per inflate step: a bomb never inflates past the cap + this
# Integer datatypes and their struct formats (little endian, as Triton's binary tensors are).
_INT_FORMATS = {"INT8": "<b", "INT16": "<h", "INT32": "<i", "INT64": "<q",
                "UINT8": "<B", "UINT16": "<H", "UINT32": "<I", "UINT64": "<Q"}
_INT64, _UINT64_MAX = (-(1 << 63), (1 << 63) - 1), (1 << 64) - 1
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class Parameter:
    """One parameter a request sets: `where` is request | input | output | generate (a generate field)."""

    where: str
    tensor: str
    key: str
    value: Any


@dataclass(frozen=True, slots=True)
class BodyView:
    """What Triton will act on: every parameter the request sets, and the max_tokens values it asks for."""

    parameters: tuple[Parameter, ...] = ()
    max_tokens: tuple[int, ...] | None = None   # None: the request names no max_tokens
    # Bytes and elements of the prompt inputs (PROMPT_INPUTS): the prompt's tokens are at most
    # prompt_bytes + PROMPT_SLACK per element (prompt_bound).
    prompt_bytes: int = 0
    prompts: int = 0
    # The request's `outputs` leave out a token count or classify one: its response will not say
    # what it used, and the meter settles at the bound instead (pipeline._used_tokens).
    counts_hidden: bool = False

    def asked_tokens(self) -> int | None:
        """The tokens the request asks for in all: each row's max_tokens (negatives count as none)."""
        return None if self.max_tokens is None else sum(max(0, v) for v in self.max_tokens)

    def prompt_bound(self) -> int:
        """At most this many prompt tokens (PROMPT_SLACK's comment says why it holds)."""
        return self.prompt_bytes + PROMPT_SLACK * max(1, self.prompts)


EMPTY = BodyView()


def bad(reason: str, message: str) -> BadRequest:
    return BadRequest(f"body: {reason}", public_message=message)


# ------------------------------------------------------------------ HTTP: encoding

def route_kind(path: str) -> str:
    """generate (generate and generate_stream), infer, or "" for routes whose body is not an inference."""
    if path.endswith(("/generate", "/generate_stream")):
        return "generate"
    return "infer" if path.endswith("/infer") else ""


def decode(body: bytes, content_encodings: list[str], kind: str, limit: int) -> bytes:
    """The body as Triton will read it: inflated where Triton inflates, refused where Triton would refuse.

    Triton reads exactly `gzip` or `deflate` (zlib or gzip framing) on infer and nothing but
    `identity` on generate; an empty or differently spelled value is refused there too.
    """
    if not content_encodings:
        return body
    if len(content_encodings) > 1:
        raise bad("several_content_encodings", "send at most one Content-Encoding header")
    coding = content_encodings[0].strip(" \t")
    if coding == "identity":
        return body
    if kind != "infer" or coding not in ("gzip", "deflate"):
        where = "generate accepts only identity" if kind == "generate" else "infer accepts gzip, deflate or identity"
        raise UnsupportedMediaType(f"body: content_encoding_unsupported: {coding[:40]!r} on {kind or 'this route'}",
                                   public_message=f"unsupported Content-Encoding: {where}")
    # gzip: gzip framing only; deflate: zlib or gzip framing, as Triton's inflateInit2(15 + 32).
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if coding == "gzip" else 32 + zlib.MAX_WBITS)
    out: list[bytes] = []
    size, data = 0, body
    try:
        while not decoder.eof:
            # Called again with nothing left to feed, it still hands out what it holds back.
            chunk = decoder.decompress(data, DECODE_STEP)
            if not chunk and not data:
                break   # all input read, the stream not ended: truncated
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body_too_large: decoded over {limit}")
            out.append(chunk)
            data = decoder.unconsumed_tail
    except zlib.error as exc:
        raise bad("malformed_compressed_body", "malformed compressed body") from exc
    if not decoder.eof:
        raise bad("truncated_compressed_body", "compressed body ends early")
    if decoder.unused_data:
        # Triton inflates the first stream and ignores what follows; a check that read on would disagree.
        raise bad("data_after_compressed_body", "bytes follow the compressed body")
    return b"".join(out)


# ------------------------------------------------------------------ HTTP: JSON

def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)   # built in C; it is smaller than the pairs only where a key repeats
    if len(obj) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))   # type: ignore[func-returns-value]
        raise bad("duplicate_key", f"duplicate JSON key {key[:64]!r}")
    if "\x00" in "".join(obj):
        raise bad("nul_in_key", "JSON key contains NUL")
    return obj


def _int(literal: str) -> int:
    # Any 64-bit integer has at most 20 digits and a sign: a longer literal is refused before int(), which
    # raises past Python's 4300-digit limit (a ValueError: a 500, not this 400).
    value = int(literal) if len(literal) <= 21 else _UINT64_MAX + 1
    if not _INT64[0] <= value <= _UINT64_MAX:
        # rapidjson reads such a literal as a double, Python as an exact int: they would disagree.
        raise bad("integer_out_of_range", f"integer {literal[:24]} is outside the 64-bit range")
    return value


# One decoder for every body: json.loads with hooks would build a new one per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_int=_int)


def parse_json(data: bytes) -> dict[str, Any]:
    """A JSON object decoded strictly: whatever rapidjson could read otherwise is refused (module doc)."""
    try:
        text = data.decode("utf-8")   # strict: never json's UTF-16/32 guessing on bytes
    except UnicodeDecodeError as exc:
        raise bad("not_utf8", "request body is not UTF-8") from exc
    if text.startswith("\ufeff"):
        raise bad("byte_order_mark", "request body starts with a byte-order mark")
    try:
        doc = _DECODER.decode(text)
    except RecursionError as exc:
        raise bad("json_too_deep", "request JSON nests too deep") from exc
    except json.JSONDecodeError as exc:
        raise bad("malformed_json", f"malformed JSON: {exc.msg} at {exc.pos}") from exc
    if not isinstance(doc, dict):
        raise bad("json_not_object", "request JSON must be an object")
    if _SURROGATE_ESCAPE.search(text):   # only escapes ("\ud800") make them: the text itself was UTF-8
        _refuse_surrogates(doc)
    return doc


def _refuse_surrogates(value: Any) -> None:
    # Walked with a stack, not recursion: the decoder accepts nesting close to the recursion limit,
    # and a recursive walk (or the exception it raised at the bottom) could overrun it: a 500.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise bad("lone_surrogate", "JSON string holds a lone surrogate escape") from exc
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def header_length(values: list[str], size: int) -> int | None:
    """Inference-Header-Content-Length as Triton will use it; None when absent (the body is all JSON)."""
    if not values:
        return None
    if len(values) > 1:
        raise bad("several_header_lengths", "send at most one Inference-Header-Content-Length")
    text = values[0].strip(" \t")
    if not text.isascii() or not text.isdigit() or int(text) > size:
        raise bad("bad_header_length", f"Inference-Header-Content-Length must be digits within the body's "
                                       f"{size} bytes")
    return int(text)


def view_http(kind: str, body: bytes, header_lengths: list[str]) -> BodyView:
    """The view of a decoded generate / infer body (`decode` first)."""
    if kind == "generate":
        return _view_generate(parse_json(body))
    length = header_length(header_lengths, len(body))
    if length == 0 or (length is None and not body):
        # Triton's raw binary request: the body is one tensor's bytes, no JSON, no parameters. An empty
        # body without the header is one too (Triton runs it as a single input's empty tensor).
        return EMPTY
    if length is None:
        return _view_infer(parse_json(body), b"")
    return _view_infer(parse_json(body[:length]), body[length:])


def _view_generate(doc: dict[str, Any]) -> BodyView:
    """Top-level fields and the members of "parameters" alike become inputs or request parameters."""
    fields = [(k, v) for k, v in doc.items() if k != "parameters"]
    nested = doc.get("parameters", {})
    if not isinstance(nested, dict):
        raise bad("parameters_not_object", "'parameters' must be an object")
    for key in nested:
        if key in doc:
            raise bad("duplicate_key", f"{key[:64]!r} given both at top level and in 'parameters'")
    fields += list(nested.items())
    # Generate bodies name no datatype; Triton casts to the model's (INT32 for deepseek) and wraps:
    # what would not fit INT32 is refused. So is a negative count: a model whose max_tokens is INT8 or
    # INT16 gets it wrapped into a positive one (-65336 is 200 in INT16), where the meter counts it as
    # none. A positive value it wraps comes out smaller than the count the meter and the cap read.
    max_tokens = next((_ints(v, "INT32", MAX_TOKENS) for k, v in fields if k == MAX_TOKENS), None)
    if max_tokens is not None and min(max_tokens, default=0) < 0:
        raise bad("max_tokens_negative", f"{MAX_TOKENS} must not be negative")
    size, count = 0, 0
    for k, v in fields:
        if k in PROMPT_INPUTS:
            b, n = _text_size(v)
            size, count = size + b, count + n
    # Generate answers carry every output, so the counts are never hidden there.
    return BodyView(tuple(Parameter("generate", "", k, v) for k, v in fields), max_tokens, size, count)


def _text_size(value: Any) -> tuple[int, int]:
    """UTF-8 bytes and elements of a JSON tensor's strings (nested lists flattened, iteratively)."""
    size, count, stack = 0, 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            # Surrogates are refused before this; a non-string Triton converts or refuses: its text bounds it.
            size += len((item if isinstance(item, str) else json.dumps(item)).encode("utf-8", "surrogatepass"))
            count += 1
    return size, count


def _hides_counts(outputs: list[tuple[str, list[str]]]) -> bool:
    """Whether an `outputs` list (name, parameter keys) keeps a token count out of the response.

    An empty list asks for every output. Else only the outputs named come back, and a classified
    one comes back as class labels, not the count."""
    if not outputs:
        return False
    named = dict(outputs)
    return any(c not in named or "classification" in named[c] for c in COUNT_OUTPUTS)


def _unique_outputs(outputs: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """The outputs, refused where one is named twice.

    Triton answers an output named twice once, as its first request for it says (classified or
    not), where a dict of them keeps the last: a stream message asking for `output_tokens`
    classified, then plain, would be metered as if its count came back, and its tokens never
    charged. No client needs an output twice, so it is refused, as an input given twice is."""
    seen: set[str] = set()
    for name, _ in outputs:
        if name in seen:
            raise bad("duplicate_output", f"output {name[:64]!r} requested twice")
        seen.add(name)
    return outputs


def _params(owner: dict[str, Any], where: str, tensor: str) -> list[Parameter]:
    params = owner.get("parameters")
    if params is None:
        return []
    if not isinstance(params, dict):
        raise bad("parameters_not_object", "'parameters' must be an object")
    return [Parameter(where, tensor, k, v) for k, v in params.items()]


def _c_string(value: str, what: str) -> None:
    """A tensor's name or datatype, refused where it holds NUL: Triton reads it as a C string, cut there
    ("max_tokens\\x00x" names max_tokens), where this view would read the whole."""
    if "\x00" in value:
        raise bad("nul_in_name", f"{what} {value.partition(chr(0))[0][:64]!r} contains NUL")


def _tensors(doc: dict[str, Any], field: str) -> list[dict[str, Any]]:
    tensors = doc.get(field, [])
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        raise bad("tensors_not_objects", f"'{field}' must be a list of objects")
    return tensors


def _view_infer(doc: dict[str, Any], binary: bytes) -> BodyView:
    params = _params(doc, "request", "")
    max_tokens: tuple[int, ...] | None = None
    prompt_bytes, prompts = 0, 0
    offset, names = 0, set()
    for tensor in _tensors(doc, "inputs"):
        name = tensor.get("name")
        if not isinstance(name, str):
            raise bad("input_without_name", "every input needs a string 'name'")
        _c_string(name, "input name")
        if isinstance(tensor.get("datatype"), str):
            _c_string(tensor["datatype"], f"datatype of input {name[:64]!r}")
        if name in names:
            raise bad("duplicate_input", f"input {name[:64]!r} given twice")
        names.add(name)
        own = _params(tensor, "input", name)
        params += own
        size = next((p.value for p in own if p.key == "binary_data_size"), None)
        data: bytes | None = None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise bad("bad_binary_data_size", f"binary_data_size of {name[:64]!r} must be a count of bytes")
            data, offset = binary[offset:offset + size], offset + size
            if len(data) != size:
                raise bad("binary_data_short", f"binary data of {name[:64]!r} ends early")
        in_region = any(p.key.startswith("shared_memory_") for p in own)
        if data is None and not in_region:
            _shape_fits_data(tensor, name)
        if name == MAX_TOKENS and not in_region:
            datatype = str(tensor.get("datatype", ""))
            max_tokens = _unpack(datatype, data) if data is not None else _ints(tensor.get("data"), datatype, name)
        if name in PROMPT_INPUTS:
            b, n = _tensor_text_size(tensor, own, data)
            prompt_bytes, prompts = prompt_bytes + b, prompts + n
    if offset != len(binary):
        raise bad("binary_data_size_mismatch", f"binary tensors declare {offset} bytes, the body has {len(binary)}")
    outputs: list[tuple[str, list[str]]] = []
    for tensor in _tensors(doc, "outputs"):
        name = tensor.get("name")
        if isinstance(name, str):
            _c_string(name, "output name")
        own = _params(tensor, "output", name if isinstance(name, str) else "")
        params += own
        outputs.append((name if isinstance(name, str) else "", [p.key for p in own]))
    return BodyView(tuple(params), max_tokens, prompt_bytes, prompts, _hides_counts(_unique_outputs(outputs)))


# Elements a JSON tensor's shape may claim beyond the values its `data` holds (see _shape_fits_data).
UNFILLED_ELEMENTS_MAX = 1 << 20


def _shape_fits_data(tensor: dict[str, Any], name: str) -> None:
    """A JSON `data` tensor whose shape claims far more elements than it holds is refused.

    Triton sizes the tensor's buffer from the shape before it reads the data: one INT32 value under
    shape [1, 100000000000] kills tritonserver 2.51 (std::bad_alloc), every model with it. A smaller
    mismatch Triton refuses itself, in its own words (a decoupled model's infer says 501 first), so it
    is forwarded as it is: up to UNFILLED_ELEMENTS_MAX elements (8 MiB of INT64) more than the data.
    A shape that is not a list of non-negative integers (missing, a string, a negative or fractional
    dimension) Triton refuses before sizing anything."""
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        return
    claimed = math.prod(shape)
    if claimed <= UNFILLED_ELEMENTS_MAX:
        return   # within the slack whatever the data holds: no walk over every value of a common request
    count, stack = 0, [tensor.get("data")]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
    if claimed > count + UNFILLED_ELEMENTS_MAX:
        raise bad("shape_data_mismatch", f"{name[:64]!r} has {count} values in 'data' for shape "
                                         f"{json.dumps(shape)[:64]}")


def _tensor_text_size(tensor: dict[str, Any], own: list[Parameter], data: bytes | None) -> tuple[int, int]:
    """A prompt tensor's bytes (binary: with its length prefixes, a little more) and elements."""
    if data is not None:
        return len(data), _elements(data)
    region = next((p.value for p in own if p.key == "shared_memory_byte_size"), None)
    if region is not None:   # admins only: the region's size bounds the text in it
        return (region if isinstance(region, int) and region > 0 else 0), 1
    return _text_size(tensor.get("data"))


def _ints(value: Any, datatype: str, name: str) -> tuple[int, ...]:
    """A JSON tensor's integers (nested lists flattened), each within its datatype's range, else refused."""
    low, high = _range(datatype)
    flat: list[Any] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    if not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in flat):
        raise bad("max_tokens_not_integer", f"{name} must be an integer in [{low}, {high}]")
    return tuple(flat)


def _range(datatype: str) -> tuple[int, int]:
    fmt = _INT_FORMATS.get(datatype)
    if fmt is None:
        raise bad("max_tokens_not_integer", f"{MAX_TOKENS} must be an integer tensor, got {datatype[:16]!r}")
    bits = 8 * struct.calcsize(fmt)
    return (0, (1 << bits) - 1) if fmt[1].isupper() else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def _unpack(datatype: str, raw: bytes) -> tuple[int, ...]:
    fmt = _INT_FORMATS.get(datatype)
    if fmt is None:
        raise bad("max_tokens_not_integer", f"{MAX_TOKENS} must be an integer tensor, got {datatype[:16]!r}")
    size = struct.calcsize(fmt)
    if len(raw) % size:
        raise bad("binary_data_size_mismatch", f"{MAX_TOKENS}'s bytes are not whole {datatype} values")
    return tuple(v for (v,) in struct.iter_unpack(fmt, raw))


# ------------------------------------------------------------------ gRPC

def view_grpc(request: Any) -> BodyView:
    """The view of a ModelInferRequest (grpc has undone any message compression already)."""
    if not isinstance(request, service_pb2.ModelInferRequest):
        return EMPTY
    params = _grpc_params(request.parameters, "request", "")
    max_tokens: tuple[int, ...] | None = None
    prompt_bytes, prompts = 0, 0
    names = set()
    raw_index = 0
    for tensor in request.inputs:
        _c_string(tensor.name, "input name")
        _c_string(tensor.datatype, f"datatype of input {tensor.name[:64]!r}")
        if tensor.name in names:
            raise bad("duplicate_input", f"input {tensor.name[:64]!r} given twice")
        names.add(tensor.name)
        params += _grpc_params(tensor.parameters, "input", tensor.name)
        # Triton hands raw_input_contents out in order to the inputs not in a region (one naming
        # "shared_memory_region"), not by the input's position: after a region input, input i's
        # bytes are raw_input_contents[i - 1]. (With raw contents, Triton refuses typed ones.)
        in_region = "shared_memory_region" in tensor.parameters
        raw: bytes | None = None
        if request.raw_input_contents and not in_region:
            contents = request.raw_input_contents
            raw = contents[raw_index] if raw_index < len(contents) else b""
            raw_index += 1
        if tensor.name == MAX_TOKENS and not in_region:
            max_tokens = _unpack(tensor.datatype, raw) if raw is not None else _grpc_contents(tensor)
        if tensor.name in PROMPT_INPUTS:
            b, n = _grpc_text_size(raw, tensor)
            prompt_bytes, prompts = prompt_bytes + b, prompts + n
    outputs: list[tuple[str, list[str]]] = []
    for tensor in request.outputs:
        _c_string(tensor.name, "output name")
        params += _grpc_params(tensor.parameters, "output", tensor.name)
        outputs.append((tensor.name, list(tensor.parameters)))
    return BodyView(tuple(params), max_tokens, prompt_bytes, prompts, _hides_counts(_unique_outputs(outputs)))


def _elements(raw: bytes) -> int:
    """Elements of a serialized BYTES tensor (each a 4-byte little-endian length, then its bytes).

    Malformed (Triton refuses it): as many as there could be, one per 4 bytes."""
    count, offset = 0, 0
    while offset + 4 <= len(raw):
        offset += 4 + struct.unpack_from("<I", raw, offset)[0]
        count += 1
    return count if offset == len(raw) else 1 + len(raw) // 4


def _grpc_text_size(raw: bytes | None, tensor: Any) -> tuple[int, int]:
    """A prompt tensor's bytes and elements: raw (with length prefixes), typed, or a region's size."""
    if raw is not None:
        return len(raw), _elements(raw)
    region = tensor.parameters.get("shared_memory_byte_size")
    if region is not None:   # admins only: the region's size bounds the text in it
        return max(0, int(region.int64_param or region.uint64_param)), 1
    texts = tensor.contents.bytes_contents
    return sum(len(t) for t in texts), len(texts)


def _grpc_params(parameters: Any, where: str, tensor: str) -> list[Parameter]:
    out = []
    for key, value in parameters.items():
        if "\x00" in key:   # as HTTP's JSON keys: Triton passes a parameter's key on as a C string
            raise bad("nul_in_key", "parameter key contains NUL")
        which = value.WhichOneof("parameter_choice")
        out.append(Parameter(where, tensor, key, getattr(value, which) if which else None))
    return out


def _grpc_contents(tensor: Any) -> tuple[int, ...]:
    """Typed contents, each within the tensor's datatype's range (as HTTP's _ints): int64_contents
    under an INT32 datatype could otherwise hold a value Triton reads wrapped."""
    c = tensor.contents
    for values in (c.int_contents, c.int64_contents, c.uint_contents, c.uint64_contents):
        if len(values):
            low, high = _range(tensor.datatype)
            if not all(low <= v <= high for v in values):
                raise bad("max_tokens_not_integer", f"{MAX_TOKENS} must be an integer in [{low}, {high}]")
            return tuple(int(v) for v in values)
    if any(len(v) for v in (c.fp32_contents, c.fp64_contents, c.bool_contents, c.bytes_contents)):
        raise bad("max_tokens_not_integer", f"{MAX_TOKENS} must be an integer tensor")
    return ()

