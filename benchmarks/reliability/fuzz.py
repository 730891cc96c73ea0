"""Hostile input against a real server: the photo corpus, fixed edge cases, and hypothesis.

Every answer must be a precise status: OK for valid requests, INVALID_ARGUMENT (whose message
names the offending field in backticks) or RESOURCE_EXHAUSTED for bad or oversized ones,
NOT_FOUND for ids that do not exist. A *crash* is anything else: INTERNAL, UNKNOWN, a non-gRPC
exception, or a server that stops answering health probes SERVING afterwards.

The fuzz server runs with small limits (`FUZZ_LIMITS`) so that the valid requests hypothesis
finds are cheap on a CPU; the validation code under test is the same at any limit.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from benchmarks.reliability.corpus import Case
from benchmarks.reliability.rig import code_of, rss_bytes
from serving.stubs import SERVICE_NAME, pb

#: Small limits so valid fuzzed requests cost little CPU (validation is limit-independent).
FUZZ_LIMITS = dict(max_generate_steps=3, default_generate_steps=2, max_size=96, min_size=32,
                   max_images=2, max_prompts=2, max_personalize_steps=2, queue_size=8,
                   max_message_bytes=1 << 20, max_prompt_chars=1000)
#: Codes that are precise answers to some input; anything else is a crash.
PRECISE = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND"}
I32, I64 = 2**31 - 1, 2**63 - 1


@dataclass
class Tally:
    """Outcomes by (input kind, status code), and every crash with its input."""

    codes: Counter = field(default_factory=Counter)
    crashes: list[dict[str, Any]] = field(default_factory=list)
    imprecise: list[dict[str, Any]] = field(default_factory=list)
    tried: int = 0

    def record(self, kind: str, code: str, err: Any, what: str, allowed: set[str] = PRECISE) -> bool:
        """Count one outcome; returns False (and keeps the input) for a crash or imprecise one."""
        self.tried += 1
        self.codes[(kind, code)] += 1
        details = err.details() if isinstance(err, grpc.RpcError) else ""
        if code not in allowed:
            self.crashes.append({"kind": kind, "code": code, "details": details[:300], "input": what[:300]})
            return False
        if code == "INVALID_ARGUMENT" and "`" not in details and "request must be" not in details:
            self.imprecise.append({"kind": kind, "details": details[:300], "input": what[:300]})
            return False
        return True

    def by_code(self) -> dict[str, int]:
        out: Counter = Counter()
        for (_, code), n in self.codes.items():
            out[code] += n
        return dict(sorted(out.items()))

    def by_kind(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (kind, code), n in sorted(self.codes.items()):
            out.setdefault(kind, {})[code] = n
        return out

    def to_json(self) -> dict[str, Any]:
        return {"tried": self.tried, "by_code": self.by_code(), "by_kind": self.by_kind(),
                "crashes": self.crashes, "imprecise": self.imprecise}


def healthy(c) -> bool:
    try:
        return c.health(timeout=30) == "SERVING"
    except grpc.RpcError:
        return False


def raw_call(c, method: str, body: bytes, stream: bool, timeout: float = 120.0) -> tuple[str, Any]:
    """Send `body` as the serialized request of `method` (bytes the stub could never produce)."""
    path = f"/{SERVICE_NAME}/{method}"
    if stream:
        call = c.channel.unary_stream(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    else:
        call = c.channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return code_of(lambda: call(body, timeout=timeout, metadata=c._metadata))


# ---------------------------------------------------------------------------- the corpus
def run_corpus(c, cases: list[Case], tally: Tally, pid: int | None = None) -> dict[str, Any]:
    """Personalize with every corpus photo; each answer must be one of the case's codes."""
    pid = pid or os.getpid()
    rss = [rss_bytes(pid)]
    rows = []
    for case in cases:
        code, err = code_of(lambda case=case: c.personalize(case.data, options=c.options(steps=0), timeout=300))
        ok = tally.record("corpus", code, err, case.name, set(case.expect))
        alive = healthy(c)
        if not alive:
            tally.crashes.append({"kind": "corpus", "code": "NOT_SERVING", "details": "", "input": case.name})
        rss.append(rss_bytes(pid))
        rows.append({"name": case.name, "bytes": len(case.data), "code": code, "expect": list(case.expect),
                     "ok": ok and alive, "details": err.details()[:160] if isinstance(err, grpc.RpcError) else ""})
    return {"cases": rows, "rss_start": rss[0], "rss_peak": max(rss), "rss_end": rss[-1]}


# ---------------------------------------------------------------------------- fixed edge cases
def _utf8_bad_generate() -> bytes:
    return b"\x12\x03\xff\xfe\xfd"  # field 2 (prompt), 3 bytes that are not UTF-8


def _varint(n: int) -> bytes:
    out = b""
    n &= (1 << 64) - 1
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def edge_cases(c, photo: bytes, tally: Tally, max_message_bytes: int) -> list[dict[str, Any]]:
    """The issue's named inputs, each once: oversized, invalid UTF-8, 10k tokens, absurd numbers."""
    nan, inf = float("nan"), float("inf")
    rows: list[dict[str, Any]] = []

    def gen(name: str, prompt: str = "a photo", identity_id: str = "", expect=PRECISE, **opts):
        o = pb.GenerationOptions(**{k: v for k, v in opts.items() if k not in ("guidance", "seed")})
        for k in ("guidance", "seed"):
            if k in opts:
                setattr(o, k, opts[k])
        req = pb.GenerateRequest(prompt=prompt, identity_id=identity_id, options=o)
        code, err = code_of(lambda: c.stub.Generate(req, timeout=300, metadata=c._metadata))
        rows.append({"name": name, "code": code, "ok": tally.record("edge", code, err, name, set(expect))})

    def raw(name: str, method: str, body: bytes, stream: bool, expect=("INVALID_ARGUMENT",)):
        code, err = raw_call(c, method, body, stream)
        rows.append({"name": name, "code": code, "ok": tally.record("edge", code, err, name, set(expect))})

    inv, ok = ("INVALID_ARGUMENT",), ("OK",)
    # --- messages larger than the server accepts: over `max_message_bytes` the server names the field
    # (INVALID_ARGUMENT: "too big", not retryable); gRPC's own transport cap (4x) answers RESOURCE_EXHAUSTED
    code, err = code_of(lambda: c.personalize(b"\xff" * (max_message_bytes + 1)))
    rows.append({"name": "photo_over_max_message_bytes", "code": code,
                 "ok": tally.record("edge", code, err, "oversized photo", {"INVALID_ARGUMENT"})})
    raw("prompt_over_max_message_bytes", "Generate",
        b"\x12" + _varint(max_message_bytes + 10) + b"a" * (max_message_bytes + 10), True, inv)
    over = 4 * max_message_bytes + 10
    raw("message_over_transport_limit", "Generate", b"\x12" + _varint(over) + b"a" * over, True,
        ("RESOURCE_EXHAUSTED",))
    # --- invalid UTF-8 in every string field of a few requests
    raw("invalid_utf8_prompt", "Generate", _utf8_bad_generate(), True)
    raw("invalid_utf8_identity_id", "GetIdentity", b"\x0a\x02\xc3\x28", False)
    raw("invalid_utf8_page_token", "ListIdentities", b"\x12\x02\xed\xa0", False)  # a lone surrogate
    raw("invalid_utf8_token", "Personalize",
        b"\x0a" + _varint(len(photo)) + photo + b"\x1a\x04\x2a\x02\xff\xff", True)
    raw("truncated_wire_message", "Generate", b"\x12\x7fabc", True)
    raw("wire_garbage", "GetServerInfo", b"\xff" * 32, False)
    # --- prompts
    gen("prompt_10k_tokens", "a " * 10_000, expect=inv)
    gen("prompt_max_chars_500_tokens", ("a " * 500)[:1000], steps=1, expect=ok)
    gen("prompt_1000_emoji", "\U0001f600" * 1000, steps=1, expect=ok)
    gen("prompt_1000_cjk", "\u4eba" * 1000, steps=1, expect=ok)
    gen("prompt_rtl_combining", "\u202e" + "e\u0301" * 400, steps=1, expect=ok)
    gen("prompt_nul", "a\x00b", expect=inv)
    gen("prompt_whitespace_only", " \t\n", expect=inv)
    gen("negative_prompt_10k_tokens", "ok", negative_prompt="a " * 10_000, expect=inv)
    # --- numbers
    for name, opts in [("steps_negative", dict(steps=-1)), ("steps_huge", dict(steps=I32)),
                       ("n_negative", dict(n=-5)), ("n_huge", dict(n=I32)),
                       ("width_negative", dict(width=-64)), ("height_huge", dict(height=I32)),
                       ("width_not_multiple_of_8", dict(width=65)), ("guidance_nan", dict(guidance=nan)),
                       ("guidance_inf", dict(guidance=inf)), ("guidance_neg_inf", dict(guidance=-inf)),
                       ("guidance_1e38", dict(guidance=1e38)), ("seed_negative", dict(seed=-1)),
                       ("seed_int64_max", dict(seed=I64)), ("format_unknown", dict(format=77))]:
        gen(name, expect=inv, **opts)
    gen("identity_id_traversal", identity_id="../../etc/passwd", expect=inv)
    gen("identity_id_unknown", identity_id="f" * 32, expect=("NOT_FOUND",))
    for name, o in [("personalize_steps_negative", dict(steps=-1)), ("personalize_steps_huge", dict(steps=I32)),
                    ("personalize_rank_zero", dict(rank=0)), ("personalize_lr_nan", dict(learning_rate=nan)),
                    ("personalize_seed_negative", dict(seed=-(2**40))), ("personalize_token_unicode",
                                                                          dict(token="\u00f6hwx"))]:
        req = pb.PersonalizeRequest(photo=photo, options=pb.PersonalizeOptions(**o))
        code, err = code_of(lambda req=req: c.stub.Personalize(req, timeout=300, metadata=c._metadata))
        rows.append({"name": name, "code": code, "ok": tally.record("edge", code, err, name, set(inv))})
    too_many = pb.PersonalizeAndGenerateRequest(photo=photo, prompts=["p"] * 10_000)
    code, err = code_of(lambda: c.stub.PersonalizeAndGenerate(too_many, timeout=300, metadata=c._metadata))
    rows.append({"name": "10k_prompts", "code": code, "ok": tally.record("edge", code, err, "10k prompts", set(inv))})
    for name, req in [("page_size_negative", pb.ListIdentitiesRequest(page_size=-1)),
                      ("page_size_huge", pb.ListIdentitiesRequest(page_size=I32)),
                      ("page_token_garbage", pb.ListIdentitiesRequest(page_token="!!!"))]:
        code, err = code_of(lambda req=req: c.stub.ListIdentities(req, timeout=60, metadata=c._metadata))
        rows.append({"name": name, "code": code, "ok": tally.record("edge", code, err, name, set(inv))})
    return rows


# ---------------------------------------------------------------------------- hypothesis
# Each fuzzed request is valid except (usually) one field, drawn hostile: then an
# INVALID_ARGUMENT must name that very field, and a request that stays valid must succeed.
HOSTILE_TEXT = ["", " ", "\x00", "a" * 1000, "a" * 1001, "word " * 2000, "\U0001f600" * 300, "\ud7ff\ue000",
                "../../x", "\u202e\u0301", "%s%n%x", "'; DROP TABLE x;--", "OHWX", "o h w x"]
hostile_text = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=40))
hostile_i32 = st.one_of(st.sampled_from([-1, I32, -I32 - 1, 7, 9, 65, 4096, 0, 1]), st.integers(-I32 - 1, I32))
hostile_f32 = st.one_of(st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 30.01, -1e-45, 1e38]),
                        st.floats(width=32, allow_nan=True))
hostile_i64 = st.one_of(st.sampled_from([-1, 2**62 + 1, I64, -(2**63)]), st.integers(-(2**63), I64))
hostile_id = st.one_of(st.sampled_from(["../x", "f" * 32, "a/b", "x" * 65, "\u00e9", "-", "_" * 64, " "]),
                       st.text(max_size=70))
prompts = st.one_of(st.sampled_from(["a photo of ohwx person", "ohwx person as a knight", "x"]),
                    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=60)
                    .filter(str.strip))

GEN_FIELDS = ("prompt", "identity_id", "negative_prompt", "n", "steps", "guidance", "seed", "width", "height",
              "format")
PERS_FIELDS = ("photo", "method", "steps", "rank", "learning_rate", "seed", "token", "class_noun")


@st.composite
def generate_requests(draw) -> tuple[pb.GenerateRequest, str | None]:
    """A valid GenerateRequest (cheap under FUZZ_LIMITS), with at most one field hostile."""
    bad = draw(st.sampled_from((None, *GEN_FIELDS)))
    o = pb.GenerationOptions(negative_prompt=draw(st.sampled_from(["", "blurry"])), n=draw(st.sampled_from([0, 1, 2])),
                             steps=draw(st.sampled_from([0, 1, 2])), width=draw(st.sampled_from([0, 32, 64, 96])),
                             height=draw(st.sampled_from([0, 32, 64, 96])), format=draw(st.sampled_from([0, 1, 2, 3])))
    if draw(st.booleans()):
        o.guidance = draw(st.floats(0.0, 30.0, width=32))
    if draw(st.booleans()):
        o.seed = draw(st.integers(0, 2**62))
    req = pb.GenerateRequest(prompt=draw(prompts), options=o)
    o = req.options  # the request holds a copy: edit that one
    if bad == "prompt":
        req.prompt = draw(hostile_text)
    elif bad == "identity_id":
        req.identity_id = draw(hostile_id)
    elif bad == "negative_prompt":
        o.negative_prompt = draw(hostile_text)
    elif bad in ("n", "steps", "width", "height", "format"):
        setattr(o, bad, draw(hostile_i32))
    elif bad == "guidance":
        o.guidance = draw(hostile_f32)
    elif bad == "seed":
        o.seed = draw(hostile_i64)
    return req, bad


@st.composite
def personalize_requests(draw, photo: bytes) -> tuple[pb.PersonalizeRequest, str | None]:
    """A valid fast PersonalizeRequest (HYPERDREAMBOOTH, <= 2 steps), at most one field hostile."""
    bad = draw(st.sampled_from((None, *PERS_FIELDS)))
    o = pb.PersonalizeOptions(token=draw(st.sampled_from(["", "ohwx", "sks"])),
                              class_noun=draw(st.sampled_from(["", "person", "man", "old woman"])),
                              background=draw(st.booleans()))
    o.steps = draw(st.sampled_from([0, 1, 2]))
    if draw(st.booleans()):
        o.rank = draw(st.integers(1, 4))
    if draw(st.booleans()):
        o.learning_rate = draw(st.floats(2.0**-10, 0.5, width=32))
    if draw(st.booleans()):
        o.seed = draw(st.integers(0, 2**62))
    method = draw(st.sampled_from([pb.METHOD_UNSPECIFIED, pb.METHOD_HYPERDREAMBOOTH]))
    req = pb.PersonalizeRequest(photo=photo, method=method,
                                options=o)
    o = req.options  # the request holds a copy: edit that one
    if bad == "photo":
        req.photo = draw(st.one_of(st.binary(max_size=64), st.sampled_from([photo[: len(photo) // 2], photo[1:]])))
    elif bad == "method":
        req.method = draw(st.one_of(st.sampled_from([6, 99, -1, I32]), st.integers(-I32 - 1, I32)))
        if req.method in (pb.METHOD_LIDB, pb.METHOD_LORA, pb.METHOD_TEXTUAL_INVERSION, pb.METHOD_DREAMBOOTH):
            req.method = 99  # valid slow methods would train for minutes: not what this fuzzes
    elif bad in ("steps", "rank"):
        setattr(o, bad, draw(hostile_i32))
    elif bad == "learning_rate":
        o.learning_rate = draw(hostile_f32)
    elif bad == "seed":
        o.seed = draw(hostile_i64)
    elif bad in ("token", "class_noun"):
        setattr(o, bad, draw(hostile_text))
    return req, bad


def _field_named(details: str, bad: str | None, prefix: str) -> bool:
    """An INVALID_ARGUMENT for a request with one hostile field must name that field."""
    if bad is None:
        return False
    names = {bad, f"{prefix}.{bad}"}
    return any(f"`{n}`" in details for n in names)


def fuzz_requests(c, photo: bytes, tally: Tally, *, max_examples: int, seed: int | None,
                  raise_on_crash: bool) -> None:
    """Hypothesis over every RPC's request fields (and raw wire bytes); records each outcome."""
    cfg = settings(max_examples=max_examples, deadline=None, database=None, derandomize=seed is None,
                   suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink],
                   print_blob=False)
    md = c._metadata

    def check(kind: str, fn, what, bad: str | None = "?", prefix: str = "options") -> None:
        code, err = code_of(fn)
        ok = tally.record(kind, code, err, repr(what))
        details = err.details() if isinstance(err, grpc.RpcError) else ""
        if ok and bad != "?":
            if code == "INVALID_ARGUMENT" and not _field_named(details, bad, prefix):
                tally.imprecise.append({"kind": kind, "details": details[:300],
                                        "input": f"hostile {bad}: {what!r}"[:300]})
                ok = False
            elif code not in ("OK", "INVALID_ARGUMENT") and not (code == "NOT_FOUND" and bad == "identity_id"):
                tally.crashes.append({"kind": kind, "code": code, "details": details[:300], "input": repr(what)[:300]})
                ok = False
        if not ok and raise_on_crash:
            raise AssertionError(f"{kind}: {code} {details!r} for {what!r} (hostile field: {bad})")

    @cfg
    @given(case=generate_requests())
    def generate(case):
        req, bad = case
        check("Generate", lambda: c.stub.Generate(req, timeout=300, metadata=md), req, bad)

    @cfg
    @given(case=personalize_requests(photo))
    def personalize(case):
        req, bad = case
        shown = pb.PersonalizeRequest(photo=req.photo[:16], method=req.method, options=req.options)
        check("Personalize", lambda: c.stub.Personalize(req, timeout=300, metadata=md), shown, bad)

    @cfg
    @given(case=personalize_requests(photo), gen=generate_requests(), n_prompts=st.integers(0, 3))
    def personalize_and_generate(case, gen, n_prompts):
        (p, p_bad), (g, g_bad) = case, gen
        p.options.background = False
        req = pb.PersonalizeAndGenerateRequest(photo=p.photo, method=p.method, options=p.options,
                                               prompts=[g.prompt] * n_prompts, generation=g.options)
        shown = (p_bad, g_bad, n_prompts, g)
        check("PersonalizeAndGenerate", lambda: c.stub.PersonalizeAndGenerate(req, timeout=300, metadata=md),
              shown)

    @cfg
    @given(identity_id=hostile_id, job_id=hostile_id, page_size=hostile_i32, page_token=hostile_text,
           fmt=hostile_i32)
    def identities_and_jobs(identity_id, job_id, page_size, page_token, fmt):
        calls = [
            ("GetIdentity", lambda: c.stub.GetIdentity(pb.GetIdentityRequest(identity_id=identity_id),
                                                       timeout=60, metadata=md)),
            ("DeleteIdentity", lambda: c.stub.DeleteIdentity(pb.DeleteIdentityRequest(identity_id=identity_id),
                                                             timeout=60, metadata=md)),
            ("ExportIdentity", lambda: c.stub.ExportIdentity(pb.ExportIdentityRequest(
                identity_id=identity_id, format=fmt), timeout=60, metadata=md)),
            ("ListIdentities", lambda: c.stub.ListIdentities(pb.ListIdentitiesRequest(
                page_size=page_size, page_token=page_token), timeout=60, metadata=md)),
            ("GetJob", lambda: c.stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=60, metadata=md)),
            ("WatchJob", lambda: c.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=60, metadata=md)),
            ("CancelJob", lambda: c.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=60, metadata=md)),
        ]
        for kind, fn in calls:
            check(kind, fn, (identity_id, job_id, page_size, page_token, fmt))

    methods = [("Generate", True), ("Personalize", True), ("PersonalizeAndGenerate", True),
               ("GetIdentity", False), ("ListIdentities", False), ("DeleteIdentity", False),
               ("ExportIdentity", False), ("GetJob", False), ("WatchJob", True), ("CancelJob", False),
               ("GetServerInfo", False)]

    @cfg
    @given(method=st.sampled_from(methods), body=st.one_of(st.binary(max_size=64), st.builds(
        lambda n, tail: struct.pack("B", n) + tail, st.integers(0, 255), st.binary(max_size=32))))
    def wire(method, body):
        name, stream = method
        code, err = raw_call(c, name, body, stream)
        ok = tally.record("wire", code, err, f"{name} {body!r}")
        if not ok and raise_on_crash:
            raise AssertionError(f"wire {name}: {code} for {body!r}")

    for test in (generate, personalize, personalize_and_generate, identities_and_jobs, wire):
        if seed is not None:
            test._hypothesis_internal_use_seed = seed
        try:
            test()
        except Exception as e:  # noqa: BLE001 - recorded; tests run with raise_on_crash
            if raise_on_crash:
                raise
            tally.crashes.append({"kind": test.__name__, "code": "FALSIFIED", "details": str(e)[:500], "input": ""})
        if not healthy(c):
            tally.crashes.append({"kind": test.__name__, "code": "NOT_SERVING", "details": "", "input": ""})
            if raise_on_crash:
                raise AssertionError(f"the server stopped SERVING after fuzzing {test.__name__}")
