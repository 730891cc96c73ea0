"""The locust side of the soak (a child process: locust monkey-patches the stdlib with gevent).

    python -m benchmarks.reliability.soak_locust --config-json CFG --out RESULT

Each user is a tenant's client running a weighted mix of every RPC, including calls that must
fail (a bad prompt -> INVALID_ARGUMENT, a wrong key -> UNAUTHENTICATED): those count as
expected. RESOURCE_EXHAUSTED is back-pressure (counted apart; the user honours
`retry-after-ms`). Anything else outside a task's expected codes is an *unexpected error*.
Every call is recorded as (seconds since start, task, code, latency s, expected).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

#: task -> (weight, expected codes besides OK)
TASKS: dict[str, tuple[int, tuple[str, ...]]] = {
    "personalize_renew": (0, ()),  # not a task: each user's own identity, renewed before its TTL
    "generate_identity": (6, ()),
    "generate_base": (2, ()),
    "personalize_delete": (2, ()),
    "personalize_keep": (1, ()),
    "personalize_and_generate": (1, ()),
    "list": (2, ()),
    "get": (2, ()),
    "export": (1, ()),
    "server_info": (1, ()),
    "health": (1, ()),
    "bad_prompt": (1, ("INVALID_ARGUMENT",)),
    "bad_key": (1, ("UNAUTHENTICATED",)),
}
BACKPRESSURE = "RESOURCE_EXHAUSTED"


def _main(cfg: dict[str, Any]) -> dict[str, Any]:
    import gevent
    import grpc.experimental.gevent as grpc_gevent
    from locust import User, between, events, task
    from locust.env import Environment

    grpc_gevent.init_gevent()
    import grpc

    from serving.client import HdbClient, retry_after_ms

    photo = Path(cfg["photo"]).read_bytes()
    keys: list[tuple[str, str]] = [tuple(k) for k in cfg["keys"]]
    calls: list[tuple[float, str, str, float, bool]] = []
    t_start = time.monotonic()
    counter = {"n": 0}

    class SoakUser(User):
        wait_time = between(cfg["wait_min"], cfg["wait_max"])

        def on_start(self) -> None:
            self.k = counter["n"]
            counter["n"] += 1
            self.tenant, key = keys[self.k % len(keys)]
            self.c = HdbClient(cfg["target"], api_key=key, timeout=cfg["timeout"])
            self.ident, self.expires = "", 0.0

        def on_stop(self) -> None:
            self.c.close()

        def _run(self, name: str, fn) -> None:
            t0 = time.monotonic()
            code, wait_s = "OK", 0.0
            try:
                fn()
            except grpc.RpcError as e:
                code = e.code().name
                if code == BACKPRESSURE:
                    wait_s = (retry_after_ms(e) or 0) / 1000.0
            except Exception as e:  # noqa: BLE001 - a broken stream is an error, not a crash
                code = f"CLIENT_{type(e).__name__}"
            latency = time.monotonic() - t0
            expected = code == "OK" or code == BACKPRESSURE or code in TASKS[name][1]
            calls.append((round(t0 - t_start, 3), name, code, round(latency, 4), expected))
            events.request.fire(request_type="grpc", name=name, response_time=latency * 1000,
                                response_length=0, exception=None if expected else RuntimeError(code), context={})
            if wait_s:
                gevent.sleep(wait_s)

        def _ident(self) -> str:
            """This user's identity; a new one once the old is within `renew_s` of its TTL
            (an expired id answering NOT_FOUND is the service being right, not an error)."""
            if time.time() > self.expires - cfg["renew_s"]:
                def renew() -> None:
                    ident = self.c.personalize(photo, options=self._opts())
                    self.ident = ident.id
                    self.expires = ident.expires_at.ToSeconds() if ident.HasField("expires_at") else float("inf")

                self._run("personalize_renew", renew)
            return self.ident

        def _opts(self):
            return HdbClient.options(steps=0, seed=self.k)

        @task(TASKS["generate_identity"][0])
        def generate_identity(self) -> None:
            ident = self._ident()
            self._run("generate_identity", lambda: self.c.generate("a photo of ohwx person", ident,
                                                                   steps=cfg["gen_steps"], seed=self.k))

        @task(TASKS["generate_base"][0])
        def generate_base(self) -> None:
            self._run("generate_base", lambda: self.c.generate("a photo of a person", steps=cfg["gen_steps"]))

        @task(TASKS["personalize_delete"][0])
        def personalize_delete(self) -> None:
            def go() -> None:
                ident = self.c.personalize(photo, options=self._opts())
                self.c.delete_identity(ident.id)

            self._run("personalize_delete", go)

        @task(TASKS["personalize_keep"][0])
        def personalize_keep(self) -> None:  # left for the TTL sweeper
            self._run("personalize_keep", lambda: self.c.personalize(photo, options=self._opts()))

        @task(TASKS["personalize_and_generate"][0])
        def personalize_and_generate(self) -> None:
            def go() -> None:
                ident, _ = self.c.personalize_and_generate(
                    photo, ["ohwx person smiling"], options=self._opts(),
                    generation=HdbClient.generation(steps=cfg["gen_steps"]))
                self.c.delete_identity(ident.id)

            self._run("personalize_and_generate", go)

        @task(TASKS["list"][0])
        def list_(self) -> None:
            self._run("list", lambda: list(self.c.list_identities()))

        @task(TASKS["get"][0])
        def get(self) -> None:
            ident = self._ident()
            self._run("get", lambda: self.c.get_identity(ident))

        @task(TASKS["export"][0])
        def export(self) -> None:
            ident = self._ident()
            self._run("export", lambda: self.c.export_identity(ident))

        @task(TASKS["server_info"][0])
        def server_info(self) -> None:
            self._run("server_info", self.c.server_info)

        @task(TASKS["health"][0])
        def health(self) -> None:
            def go() -> None:
                if self.c.health() != "SERVING":
                    raise RuntimeError("not SERVING")

            self._run("health", go)

        @task(TASKS["bad_prompt"][0])
        def bad_prompt(self) -> None:
            self._run("bad_prompt", lambda: self.c.generate("x" * 5000, steps=1))

        @task(TASKS["bad_key"][0])
        def bad_key(self) -> None:
            def go() -> None:
                with HdbClient(cfg["target"], api_key="not-a-key-0123456789") as c:
                    c.server_info()

            self._run("bad_key", go)

    env = Environment(user_classes=[SoakUser], events=events)
    runner = env.create_local_runner()
    runner.start(cfg["users"], spawn_rate=cfg["users"])
    gevent.sleep(cfg["duration"])
    # Then until the run has seen what it is for (a loaded machine reaches it later, not never):
    # at least `min_renewals` renewals, i.e. identities that expired while users kept calling.
    deadline = time.monotonic() + cfg.get("max_extra_s", 0.0)
    while (sum(1 for c in calls if c[1] == "personalize_renew" and c[2] == "OK") < cfg.get("min_renewals", 0)
           and time.monotonic() < deadline):
        gevent.sleep(0.2)
    runner.quit()
    runner.greenlet.join(timeout=60)
    return {"calls": calls, "duration_s": time.monotonic() - t_start, "users": cfg["users"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-json", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import locust  # noqa: F401 - gevent's monkey-patching before anything opens a socket

    res = _main(json.loads(args.config_json.read_text()))
    args.out.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
