"""Security checks: API keys (malformed, brute force, timing), tenant isolation, TLS, rate limits.

Every case is a (name, expected status, observed status) row; `passed` counts the rows that
matched. The timing comparison (keys sharing a long prefix with a real key vs random keys) is a
statistical test reported with its numbers, never a pass/fail on wall-clock time.
"""

from __future__ import annotations

import datetime
import ipaddress
import random
import secrets
import string
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks.reliability.rig import Rig, client, code_of, wait_until
from serving.client import retry_after_ms
from serving.stubs import pb

ALICE = "alice-key-" + "0123456789abcdef" * 2
BOB = "bob-key-" + "fedcba9876543210" * 2
KEYS = f"alice:{ALICE},bob:{BOB}"


class Cases:
    """Expected vs observed status per named case."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def check(self, group: str, name: str, expect: str | set[str], code: str, note: str = "") -> bool:
        ok = code in ({expect} if isinstance(expect, str) else expect)
        self.rows.append({"group": group, "case": name, "expect": expect if isinstance(expect, str) else
                          "|".join(sorted(expect)), "got": code, "passed": ok, "note": note})
        return ok

    def summary(self) -> dict[str, Any]:
        groups: dict[str, dict[str, int]] = {}
        for r in self.rows:
            g = groups.setdefault(r["group"], {"passed": 0, "total": 0})
            g["total"] += 1
            g["passed"] += int(r["passed"])
        return {"groups": groups, "failed": [r for r in self.rows if not r["passed"]], "rows": self.rows}


def _call_with_header(c, header: str | None):
    md = () if header is None else (("authorization", header),)
    return code_of(lambda: c.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md, timeout=30))


# ---------------------------------------------------------------------------- keys
def malformed_and_brute_force(target: str, cases: Cases, n_random: int) -> None:
    """Malformed headers and `n_random` guessed keys: all UNAUTHENTICATED, keys never echoed;
    the real key still works afterwards (no lockout)."""
    with client(target, api_key="") as c:
        headers = {
            "missing": None, "empty": "", "no_scheme": ALICE, "basic_scheme": f"Basic {ALICE}",
            "lowercase_bearer_wrong_key": f"bearer {BOB}x", "bearer_only": "Bearer", "bearer_space": "Bearer ",
            "two_keys": f"Bearer {ALICE} {BOB}", "key_plus_one_char": f"Bearer {ALICE}x",
            "key_minus_one_char": f"Bearer {ALICE[:-1]}", "key_one_char_changed": f"Bearer {ALICE[:-1]}X",
            "prefix_of_key": f"Bearer {ALICE[:16]}", "key_513_chars": "Bearer " + "k" * 513,
            "key_4k_chars": "Bearer " + "k" * 4000, "sql_injection": "Bearer ' OR '1'='1",
            "tenant_colon_key": f"Bearer alice:{ALICE}", "double_space": f"Bearer  {ALICE}",
        }
        for name, header in headers.items():
            code, err = _call_with_header(c, header)
            leaked = isinstance(err, grpc.RpcError) and header and len(header) > 8 and header[7:] in err.details()
            cases.check("auth_malformed", name, "UNAUTHENTICATED", code, "key echoed!" if leaked else "")
            if leaked:
                cases.rows[-1]["passed"] = False
        code, _ = code_of(lambda: c.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30,
                                                       metadata=(("authorization-bin", ALICE.encode()),)))
        cases.check("auth_malformed", "binary_header_only", "UNAUTHENTICATED", code)
        rng = random.Random(0)
        alphabet = string.ascii_letters + string.digits + "-_"
        codes: dict[str, int] = {}
        for _ in range(n_random):
            key = "".join(rng.choice(alphabet) for _ in range(len(ALICE)))
            code, _ = _call_with_header(c, f"Bearer {key}")
            codes[code] = codes.get(code, 0) + 1
        cases.check("auth_brute_force", f"{n_random} random keys", "UNAUTHENTICATED",
                    "UNAUTHENTICATED" if set(codes) == {"UNAUTHENTICATED"} else str(codes))
        cases.check("auth_brute_force", "real key still works after", "OK", _call_with_header(c, f"Bearer {ALICE}")[0])
        cases.check("auth_open", "health needs no key", "OK",
                    code_of(lambda: c.health())[0])


def timing(target: str, n_inprocess: int, n_grpc: int) -> dict[str, Any]:
    """Auth failure time for keys sharing all but the last character with a real key vs random
    keys of the same length: in-process (`KeyRing.tenant_for`) and end to end over gRPC.
    Mann-Whitney U and Kolmogorov-Smirnov tests; a leak would show as a small p-value *and* a
    consistent median difference."""
    from scipy import stats

    from serving.auth import KeyRing
    from serving.errors import Unauthenticated

    ring = KeyRing.load("", KEYS)
    rng = random.Random(1)
    alphabet = string.ascii_letters + string.digits

    def near() -> str:
        return ALICE[:-1] + rng.choice([ch for ch in alphabet if ch != ALICE[-1]])

    def far() -> str:
        return "".join(rng.choice(alphabet) for _ in range(len(ALICE)))

    def sample(fn, n: int) -> tuple[list[float], list[float]]:
        a, b = [], []
        order = [True, False] * n
        rng.shuffle(order)  # interleaved at random: drift in machine load hits both alike
        for is_near in order:
            key = near() if is_near else far()
            t0 = time.perf_counter_ns()
            fn(key)
            (a if is_near else b).append((time.perf_counter_ns() - t0) / 1e3)
        return a, b

    def in_process(key: str) -> None:
        try:
            ring.tenant_for(f"Bearer {key}")
        except Unauthenticated:
            pass

    out: dict[str, Any] = {}
    with client(target, api_key="") as c:
        def over_grpc(key: str) -> None:
            _call_with_header(c, f"Bearer {key}")

        for _ in range(20):
            over_grpc(far())  # warm the channel
        for name, fn, n in (("in_process", in_process, n_inprocess), ("grpc", over_grpc, n_grpc)):
            a, b = sample(fn, n)
            mw, ks = stats.mannwhitneyu(a, b), stats.ks_2samp(a, b)
            med_a, med_b = float(sorted(a)[len(a) // 2]), float(sorted(b)[len(b) // 2])
            out[name] = {"n_each": n, "median_us_valid_prefix": round(med_a, 2), "median_us_random": round(med_b, 2),
                         "median_diff_pct": round(100 * (med_a - med_b) / med_b, 2),
                         "mannwhitney_p": float(mw.pvalue), "ks_p": float(ks.pvalue),
                         "leak_suspected": bool(mw.pvalue < 0.001 and abs(med_a - med_b) / med_b > 0.05)}
    return out


# ---------------------------------------------------------------------------- isolation
def isolation(target: str, photo: bytes, cases: Cases) -> None:
    """Bob (another tenant) uses alice's identity and job ids with every RPC that takes one."""
    with client(target, api_key=ALICE) as alice, client(target, api_key=BOB) as bob:
        events = list(alice.personalize_events(photo, options=alice.options(steps=0)))
        job_id, ident = events[0].accepted.job_id, events[-1].identity
        bg_call = alice.personalize_events(photo, options=alice.options(steps=2000, background=True))
        bg_job = next(iter(bg_call)).accepted.job_id
        bg_call.cancel()  # a background job outlives its call
        wait_until(lambda: alice.get_job(bg_job).state == pb.JOB_STATE_RUNNING, 120, "alice's background job to run")
        ghost = "0" * 32  # an id that exists for nobody
        rpcs = {
            "GetIdentity": lambda i, j: bob.get_identity(i),
            "Generate": lambda i, j: bob.generate("ohwx", i, steps=1),
            "ExportIdentity": lambda i, j: bob.export_identity(i),
            "DeleteIdentity": lambda i, j: bob.delete_identity(i),
            "GetJob": lambda i, j: bob.get_job(j),
            "WatchJob": lambda i, j: list(bob.watch_job(j, timeout=30)),
            "CancelJob (foreground job)": lambda i, j: bob.cancel_job(j),
            "CancelJob (running background job)": lambda i, j: bob.cancel_job(bg_job if j != ghost else ghost),
        }
        for name, call in rpcs.items():
            code, err = code_of(lambda call=call: call(ident.id, job_id))
            code_ghost, err_ghost = code_of(lambda call=call: call(ghost, ghost))
            same = (isinstance(err, grpc.RpcError) and isinstance(err_ghost, grpc.RpcError)
                    and err.details().replace(ident.id, "ID").replace(job_id, "ID").replace(bg_job, "ID")
                    == err_ghost.details().replace(ghost, "ID"))
            cases.check("isolation", name, "NOT_FOUND", code,
                        "" if same else "answer differs from a non-existent id's (existence oracle)")
            if not same:
                cases.rows[-1]["passed"] = False
        listed = {i.id for i in bob.list_identities()}
        cases.check("isolation", "ListIdentities", "OK", "OK" if ident.id not in listed else "LEAKED")
        import base64

        token = base64.urlsafe_b64encode(ident.id[:-1].encode()).decode()  # a page token near alice's id
        code, res = code_of(lambda: bob.stub.ListIdentities(pb.ListIdentitiesRequest(page_token=token),
                                                            metadata=bob._metadata, timeout=30))
        leaked = code == "OK" and ident.id in {i.id for i in res.identities}
        cases.check("isolation", "ListIdentities with a forged page_token", {"OK", "INVALID_ARGUMENT"},
                    "LEAKED" if leaked else code)
        # alice still has everything, and bob's CancelJob did not touch her running job
        cases.check("isolation", "owner still reads the identity", "OK",
                    code_of(lambda: alice.get_identity(ident.id))[0])
        cases.check("isolation", "owner's background job still runs", "JOB_STATE_RUNNING",
                    pb.JobState.Name(alice.get_job(bg_job).state))
        alice.cancel_job(bg_job)  # (it holds the model worker)
        cases.check("isolation", "owner generates with it", "OK",
                    code_of(lambda: alice.generate("ohwx", ident.id, steps=1))[0])
        alice.delete_identity(ident.id)


# ---------------------------------------------------------------------------- TLS
def self_signed(folder: Path, name: str = "localhost") -> tuple[Path, Path, bytes]:
    """A self-signed EC certificate for `name` (+ 127.0.0.1), made here with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    tag = secrets.token_hex(4)
    (folder / f"cert-{tag}.pem").write_bytes(pem)
    (folder / f"key-{tag}.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder / f"cert-{tag}.pem", folder / f"key-{tag}.pem", pem


def tls(rig: Rig, cases: Cases) -> None:
    cert, key, pem = self_signed(rig.work / "tls")
    _, _, other_pem = self_signed(rig.work / "tls-other")
    with rig.serving(tls_cert=str(cert), tls_key=str(key), no_auth=False, api_keys=KEYS) as bg:
        def info(**kw) -> str:
            with client(bg.target, **kw) as c:
                return code_of(lambda: c.server_info(timeout=10))[0]

        cases.check("tls", "trusted self-signed cert + key", "OK", info(api_key=ALICE, root_certificates=pem))
        cases.check("tls", "plaintext client", "UNAVAILABLE", info(api_key=ALICE))
        cases.check("tls", "client trusting another CA", "UNAVAILABLE",
                    info(api_key=ALICE, root_certificates=other_pem))
        cases.check("tls", "TLS without an API key", "UNAUTHENTICATED", info(api_key="", root_certificates=pem))
        with grpc.secure_channel(bg.target, grpc.ssl_channel_credentials(pem),
                                 options=[("grpc.ssl_target_name_override", "evil.example")]) as ch:
            from serving.stubs import pb_grpc

            code, _ = code_of(lambda: pb_grpc.PersonalizationServiceStub(ch).GetServerInfo(
                pb.GetServerInfoRequest(), metadata=(("authorization", f"Bearer {ALICE}"),), timeout=10))
        cases.check("tls", "certificate for another host name", "UNAVAILABLE", code)


# ---------------------------------------------------------------------------- rate limits
def rate_limit(rig: Rig, cases: Cases) -> dict[str, Any]:
    """Alice floods (burst 4, 2/s): RESOURCE_EXHAUSTED with a retry hint, nothing queued; bob,
    at the same time, is untouched; alice is served again after the hint."""
    out: dict[str, Any] = {}
    with rig.serving(no_auth=False, api_keys=KEYS, rate_limit_rps=2.0, rate_limit_burst=4) as bg, \
            client(bg.target, api_key=ALICE) as alice, client(bg.target, api_key=BOB) as bob:
        codes, hints = [], []
        for _ in range(12):
            code, err = code_of(lambda: alice.generate("a photo", steps=1))
            codes.append(code)
            if code == "RESOURCE_EXHAUSTED":
                hints.append(retry_after_ms(err))
        out["alice_codes"] = {k: codes.count(k) for k in sorted(set(codes))}
        out["retry_after_ms"] = hints[:3]
        cases.check("rate_limit", "flooding tenant is limited", "RESOURCE_EXHAUSTED",
                    "RESOURCE_EXHAUSTED" if "RESOURCE_EXHAUSTED" in codes else str(out["alice_codes"]))
        cases.check("rate_limit", "limited answers carry retry-after-ms", "yes",
                    "yes" if hints and all(h and h > 0 for h in hints) else "no")
        bob_codes = [code_of(lambda: bob.server_info())[0] for _ in range(3)]
        cases.check("rate_limit", "other tenant unaffected", "OK",
                    "OK" if set(bob_codes) == {"OK"} else str(bob_codes))
        cases.check("rate_limit", "unauthenticated calls spend no tenant tokens", "UNAUTHENTICATED",
                    _call_with_header(bob, "Bearer nobody-0123456789abcdef")[0])
        time.sleep(max(hints or [1000]) / 1000.0 + 0.05)
        cases.check("rate_limit", "served again after the hint", "OK", code_of(lambda: alice.server_info())[0])
        cases.check("rate_limit", "health probes are never limited", "SERVING", alice.health())
    return out


def run(rig: Rig, photo: bytes, *, short: bool) -> dict[str, Any]:
    cases = Cases()
    out: dict[str, Any] = {}
    with rig.serving(no_auth=False, api_keys=KEYS, host="127.0.0.1") as bg:
        target = f"127.0.0.1:{bg.port}"
        malformed_and_brute_force(target, cases, n_random=100 if short else 1000)
        isolation(target, photo, cases)
        out["timing"] = timing(target, n_inprocess=2000 if short else 20000, n_grpc=100 if short else 1000)
    tls(rig, cases)
    out["rate_limit"] = rate_limit(rig, cases)
    out["cases"] = cases.summary()
    return out


__all__ = ["ALICE", "BOB", "KEYS", "Cases", "isolation", "malformed_and_brute_force", "rate_limit", "run",
           "self_signed", "timing", "tls"]
